"""A callback that works on any skipnets model through the skip-block contract."""

from __future__ import annotations

import json

from lightning.pytorch import Callback, LightningModule, Trainer

from skipnets.errors import ConfigError
from skipnets.nn import skip_blocks
from skipnets.runs import run_dir


class BlockCensus(Callback):
    """Writes ``<run dir>/census/blocks.json``: every skip block with its kind, stage and size.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: BlockCensus
              init_args: {filename: blocks.json}

    Args:
        filename: name of the JSON file written under ``<run dir>/census/``.
    """

    def __init__(self, filename: str = "blocks.json") -> None:
        super().__init__()
        if not filename.endswith(".json") or "/" in filename:
            raise ConfigError(f"filename must be a plain *.json name, got {filename!r}")
        self.filename = filename

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:  # one writer under DDP
            return
        blocks = [
            {
                "name": name,
                "kind": block.kind,
                "stage": block.stage,
                "parameters": sum(p.numel() for p in block.parameters()),
            }
            for name, block in skip_blocks(pl_module)
        ]
        path = run_dir(trainer) / "census" / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"blocks": blocks}, indent=2))
