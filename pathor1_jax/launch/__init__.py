"""Launchers that start a run's processes (`local`: a multi-host job on one machine; `compile`:
`pathor1 compile` in a child process, with its cost)."""
