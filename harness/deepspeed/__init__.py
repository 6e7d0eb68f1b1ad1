"""Distributed trials: DeepSpeed ZeRO-2/3 under Ray Train, one module per concern.

- `launch`: the Tune driver per trial, the Ray Train worker group, the per-rank trial
  (`rank_trial`: harness.training.trial's one recipe on the DeepSpeed backend);
- `engine`: the DeepSpeed backend (harness.training.backend's `Backend`) and its optimizer step over
  this rank's micro-batches (`global_batch_step`, `ClipAndTransform`);
- `zero_access`: parameters and gradients as full tensors under ZeRO (`ZeroParamAccess`),
  gathering for the adapter artifact and the merge check;
- `rank_data`: this rank's micro-batches of each global batch (`RankShares`);
- `checkpoint`: DeepSpeed checkpoints and the adapter artifact through Ray Train storage;
- `collectives`: small collectives and the digests by which the ranks check they agree;
- `storage`: where Tune and Train persist, and the shared-storage rule of a multi-node
  cluster;
- `config`: the DeepSpeed JSON config rendered from the sweep's `distributed` section.

DeepSpeed and Ray are imported inside the functions that need them, so the sweep's driver
imports this package without either.
"""
