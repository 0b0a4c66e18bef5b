// The API reference at /api/v1/docs: renders /api/v1/openapi.json with our own code (no CDN
// script in the dashboard's origin, where the admin token lives in localStorage).

import { append, h, table } from "./util.js";

const SPEC_URL = "/api/v1/openapi.json";
const METHODS = ["get", "post", "put", "patch", "delete"];

/** The schema behind a `$ref` ("#/components/schemas/X"), or the schema itself. */
function resolve(spec, schema) {
  if (!schema || !schema.$ref) return schema || {};
  return schema.$ref
    .replace(/^#\//, "")
    .split("/")
    .reduce((node, key) => (node ? node[key] : undefined), spec) || {};
}

/** A short type text: "string", "integer (1..1000)", "A | B", "array of X", "Model". */
function typeText(spec, schema) {
  if (!schema) return "-";
  if (schema.$ref) return schema.$ref.split("/").pop();
  const any = schema.anyOf || schema.oneOf;
  if (any) return any.map((s) => typeText(spec, s)).join(" | ");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.type === "array") return `array of ${typeText(spec, schema.items)}`;
  const bounds = [];
  if (schema.minimum !== undefined) bounds.push(`>= ${schema.minimum}`);
  if (schema.maximum !== undefined) bounds.push(`<= ${schema.maximum}`);
  return [schema.type || "object", bounds.length ? `(${bounds.join(", ")})` : ""].join(" ").trim();
}

function parameters(spec, op) {
  const params = op.parameters || [];
  if (!params.length) return null;
  return table(
    "Parameters",
    ["Name", "In", "Type", "Default", "Description"],
    params.map((p) => [
      h("code", {}, p.name),
      p.in,
      typeText(spec, p.schema),
      p.schema && p.schema.default !== undefined ? JSON.stringify(p.schema.default) : p.required ? "required" : "-",
      p.description || p.schema?.description || "",
    ]),
    { class: "compact" },
  );
}

function body(spec, op) {
  const content = op.requestBody?.content?.["application/json"];
  if (!content) return null;
  const schema = resolve(spec, content.schema);
  const required = new Set(schema.required || []);
  return table(
    `Request body (${typeText(spec, content.schema)})`,
    ["Field", "Type", "Default", "Description"],
    Object.entries(schema.properties || {}).map(([name, prop]) => [
      h("code", {}, name),
      typeText(spec, prop),
      prop.default !== undefined ? JSON.stringify(prop.default) : required.has(name) ? "required" : "-",
      prop.description || "",
    ]),
    { class: "compact" },
  );
}

function responses(spec, op) {
  return table(
    "Responses",
    ["Status", "Description", "Body"],
    Object.entries(op.responses || {}).map(([status, r]) => {
      const media = Object.entries(r.content || {})[0];
      return [status, r.description || "", media ? `${media[0]}: ${typeText(spec, media[1].schema)}` : "-"];
    }),
    { class: "compact" },
  );
}

function operation(spec, path, method, op) {
  const id = `${method}-${path}`.replace(/[^a-z0-9]+/gi, "-");
  return h(
    "section",
    { class: "operation", id, "data-testid": `op-${method}-${path}` },
    h("h3", {}, h("span", { class: `badge method-${method}` }, method.toUpperCase()), " ", h("code", {}, path)),
    op.summary ? h("p", {}, h("strong", {}, op.summary)) : null,
    op.description ? h("p", { class: "muted" }, op.description) : null,
    parameters(spec, op),
    body(spec, op),
    responses(spec, op),
  );
}

async function main() {
  const root = document.getElementById("docs");
  let spec;
  try {
    const response = await fetch(SPEC_URL, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    spec = await response.json();
  } catch (error) {
    root.replaceChildren(h("p", { class: "status error" }, `Could not load ${SPEC_URL}: ${error.message}`));
    return;
  }
  const ops = [];
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      if (item[method]) ops.push([path, method, item[method]]);
    }
  }
  const index = h(
    "ul",
    { class: "toc", "data-testid": "api-docs-index" },
    ops.map(([path, method]) =>
      h("li", {}, h("a", { href: `#${`${method}-${path}`.replace(/[^a-z0-9]+/gi, "-")}` }, `${method.toUpperCase()} ${path}`)),
    ),
  );
  root.replaceChildren();
  append(root, [
    h("h1", {}, `${spec.info?.title || "API"} ${spec.info?.version || ""}`),
    spec.info?.summary ? h("p", {}, spec.info.summary) : null,
    h(
      "p",
      {},
      "Every route needs ",
      h("code", {}, "Authorization: Bearer <token>"),
      " (",
      h("code", {}, "edgefleet tokens create NAME"),
      "). Machine-readable: ",
      h("a", { href: SPEC_URL }, SPEC_URL),
      ".",
    ),
    index,
    ops.map(([path, method, op]) => operation(spec, path, method, op)),
  ]);
}

main();
