"""Launchers that start a run's processes (`local`: a multi-host job on one machine)."""
