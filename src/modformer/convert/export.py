"""`modformer export hf MODEL DST`: a saved modformer model as a native transformers
directory that loads without modformer (no trust_remote_code).

- ``GPTForCausalLM`` -> ``GPT2LMHeadModel`` (`modformer.convert.gpt2.export_gpt2`);
- ``ModuleFormerForCausalLM`` with JetMoE's options -> ``JetMoeForCausalLM``
  (`modformer.convert.jetmoe.export_jetmoe`; an option JetMoE lacks is an error naming it).

Other architectures (MoM) have no native transformers class: an error says so.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from modformer.convert.gpt2 import ConversionError, export_gpt2
from modformer.convert.jetmoe import export_jetmoe
from modformer.models.gpt import GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerForCausalLM

# modformer class -> the exporter to its native transformers counterpart.
EXPORTERS = {GPTForCausalLM: export_gpt2, ModuleFormerForCausalLM: export_jetmoe}


def export_hf(model: PreTrainedModel, dst: str | Path, tokenizer_dir: Path | None = None) -> Path:
    """Write `model` as the native transformers class of its architecture (`EXPORTERS`)."""
    for model_class, exporter in EXPORTERS.items():
        if isinstance(model, model_class):
            return exporter(model, dst, tokenizer_dir)
    raise ConversionError(
        f"{type(model).__name__} has no native transformers counterpart; `export hf` writes "
        f"GPT models as GPT2LMHeadModel and JetMoE-style ModuleFormers as JetMoeForCausalLM"
    )
