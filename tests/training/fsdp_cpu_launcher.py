"""``magdiff`` under accelerate's FSDP on CPU processes, for the sharded-training tests.

accelerate (1.16) takes an FSDP config only on accelerator devices: on CPU processes it starts its multi-CPU (gloo)
DDP mode instead. This launcher, run by ``accelerate launch --config_file fsdp.yaml``, makes ``AcceleratorState``
keep the FSDP plugin that accelerate built from the config when it would fall back to multi-CPU, so the trainer runs
accelerate's own FSDP2 preparation (``fully_shard``, DTensor parameters and optimiser) over gloo. Nothing else of
accelerate or of the trainer is changed.
"""

from __future__ import annotations

import sys

import accelerate.state
from accelerate.utils import DistributedType

_original_init = accelerate.state.AcceleratorState.__init__


def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_keeping_fsdp

if __name__ == "__main__":
    from magdiff.cli import main

    sys.exit(main(sys.argv[1:]))
