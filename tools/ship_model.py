"""Store a training checkpoint compactly as the shipped model: bf16 weights, the Args and tokenization settings,
the step and validation loss; no optimizer state.

    python tools/ship_model.py content/checkpoints/best.pt [models/long_cpu.pt [./content/parts_dataset]]

The third argument is the data folder the shipped model names as its training data, which evaluate.py reads by
default: a run on a folder made for it (one linking the model's own pieces beside the bundled zip) names the bundled
folder whose held-out files it is measured on. Without it, a folder inside the repository is named relative to it,
so the name holds in any clone.

bf16 halves the file; generation and fine-tuning load the weights back into a float32 model (runtime.load_model
and Args.init_from).
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import SHIPPED_MODEL, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402

# styles: a conditioned model's; tune_lengths: a tune_length model's
KEEP = ('step', 'loss', 'best_val_loss', 'args', 'tokenization', 'styles', 'tune_lengths')


def in_repo(data_path):
    """'./content/x' for a folder inside the repository, the path as it is for one outside it."""
    path = Path(data_path).resolve()
    return f'./{path.relative_to(ROOT).as_posix()}' if path.is_relative_to(ROOT) else data_path


def main():
    if not 2 <= len(sys.argv) <= 4:
        print('usage: python tools/ship_model.py CHECKPOINT [TARGET [DATA_FOLDER]]', file=sys.stderr)
        sys.exit(2)
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else SHIPPED_MODEL
    try:
        ckpt = load_checkpoint(source)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    shipped = {key: ckpt[key] for key in KEEP if key in ckpt}
    shipped['model_state_dict'] = {name: t.to(torch.bfloat16) if t.is_floating_point() else t
                                   for name, t in ckpt['model_state_dict'].items()}
    # paths of the machine it was trained on mean nothing elsewhere
    shipped['args'] = {k: v for k, v in shipped['args'].items() if k not in ('checkpoint', 'init_from')}
    shipped['args']['data_path'] = sys.argv[3] if len(sys.argv) > 3 else in_repo(shipped['args']['data_path'])
    shipped['args']['cache_dir'] = './content/cache'  # Args' default: a token cache is the clone's, not the model's
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, shipped)
    print(f'{target}: {target.stat().st_size / 1e6:.1f} MB from {source} (step {ckpt["step"]}, validation loss '
          f'{ckpt.get("best_val_loss", float("nan")):.4f})')


if __name__ == '__main__':
    main()
