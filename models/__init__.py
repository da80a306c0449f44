"""Model recipes (YAML) shipped as package data: one per dataset/backbone with the paper's settings."""
