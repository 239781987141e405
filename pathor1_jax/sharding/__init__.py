"""One device mesh and logical-axis sharding rules for every model and stage.

- `logical`: `use_rules(mesh, rules)`, `constrain(x, axes)`, `logical_to_spec(axes, rules)`.
- `mesh`: `make_mesh(config.mesh)` (axes data / fsdp / tensor, Auto), `abstract_mesh(config, n)`.
- `rules`: presets `dp`, `fsdp`, `fsdp_tp`; `rules_from_config(config.sharding)`; validation.
- `params`: per-variable layouts and shardings, `create_sharded`, `shard_model`.
- `safetensors_load`: checkpoints read slice by slice into sharded arrays (`load_sharded`).
- `qwen_checkpoint`: `load_pretrained_sharded` for Qwen2.5-VL Hugging Face checkpoints.
- `multihost`: `maybe_initialize_distributed`, `is_main_process`, `make_global_batch`.
- `report`: per-device bytes of parameters + AdamW state (`pathor1 shardings`).
"""
