"""Fleet security: device identity (CA, passwords, bundles) and the broker's ACL/TLS config."""
