"""Running a sweep on Ray Tune: the driver and trainable, the dry-run plan, progress lines, live
tracking (MLflow/W&B), crash witnessing and memory estimates."""
