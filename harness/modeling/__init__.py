"""Loading pretrained models (hub, mirror, packaged GGUF, seeded random-init) and their structure;
image backbones."""
