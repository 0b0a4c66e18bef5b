"""MQTT brokers the controller starts or configures: mosquitto and the in-process amqtt."""
