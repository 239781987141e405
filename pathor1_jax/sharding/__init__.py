"""One device mesh and logical-axis sharding rules for every model and stage: where tensors go.

The logical axis names themselves (`use_rules`, `constrain`, `logical_to_spec`) live below the
models in `pathor1_jax.logical`; checkpoints are read sharded by the models' loaders
(`models.safetensors_load.load_sharded`, given `params.state_shardings`).

- `mesh`: `make_mesh(config.mesh)` (axes data / fsdp / tensor, Auto), `abstract_mesh(config, n)`.
- `rules`: presets `dp`, `fsdp`, `fsdp_tp`; `rules_from_config(config.sharding)`; validation.
- `params`: per-variable layouts and shardings (`state_shardings`), `create_sharded`, `shard_model`.
- `multihost`: `maybe_initialize_distributed`, `is_main_process`, `make_global_batch`; `env`: the
  variables a launcher sets for each process.
- `report`: per-device bytes of parameters + AdamW state (`pathor1 shardings`).
"""
