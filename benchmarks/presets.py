"""Real model shapes for random-weight benchmarks; they live in `pagedllm.benchmarks.presets`
(re-exported here for the scripts in this folder)."""

from pagedllm.benchmarks.presets import PRESETS, preset_folder

__all__ = ["PRESETS", "preset_folder"]
