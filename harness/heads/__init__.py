"""How a task's rows reach a model and its outputs become metrics, one pipeline per head kind
(pipelines.PIPELINE_BUILDERS), and eval sharding across ranks."""
