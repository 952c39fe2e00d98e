"""Store a training checkpoint compactly as the shipped model: bf16 weights, the Args and tokenization settings,
the step and validation loss; no optimizer state.

    python tools/ship_model.py content/checkpoints/best.pt [models/long_cpu.pt]

bf16 halves the file; generation and fine-tuning load the weights back into a float32 model (runtime.load_model
and Args.init_from), whose validation NLL tools/ship_model.py prints next to the checkpoint's.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import SHIPPED_MODEL, load_checkpoint, save_checkpoint  # noqa: E402

KEEP = ('step', 'loss', 'best_val_loss', 'args', 'tokenization', 'styles')  # styles: a conditioned model's


def main():
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else SHIPPED_MODEL
    ckpt = load_checkpoint(source)
    shipped = {key: ckpt[key] for key in KEEP if key in ckpt}
    shipped['model_state_dict'] = {name: t.to(torch.bfloat16) if t.is_floating_point() else t
                                   for name, t in ckpt['model_state_dict'].items()}
    # paths of the machine it was trained on mean nothing elsewhere
    shipped['args'] = {k: v for k, v in shipped['args'].items() if k not in ('checkpoint', 'init_from')}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, shipped)
    print(f'{target}: {target.stat().st_size / 1e6:.1f} MB from {source} (step {ckpt["step"]}, validation loss '
          f'{ckpt.get("best_val_loss", float("nan")):.4f})')


if __name__ == '__main__':
    main()
