"""Fine-tune a tiny transformer (built from a config, random weights, nothing downloaded) on a
synthetic sequence task with Hugging Face's Trainer: plain AdamW against SAMTrainer with SAM
and with VaSSORe (which skips pass 1 when its criterion allows), same data, same seeds.

The task: sequences of 24 tokens from a vocabulary of 32; the label is 1 when more tokens
fall in the upper half of the vocabulary than in the lower half, with 20% of the training
labels flipped (the noise sharpness-aware training is meant to resist). Prints test
accuracy, final training loss, wall time per optimizer step (median of the steps after the
first two) and forward+backward passes per step.

    python examples/hf_trainer_demo.py [--steps 200] [--seeds 0 1 2] [--threads 1] [--out DIR]

Writes the Trainer's output directories and results.json under --out (default: the untracked
examples/out/hf_trainer_demo/).
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

from sam_kernels.integrations.transformers import SAMTrainer  # noqa: E402

VOCAB, SEQ = 32, 24


def make_data(n, seed, noise):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ((ids >= VOCAB // 2).sum(1) > SEQ // 2).long()
    flip = torch.rand(n, generator=g) < noise
    labels = torch.where(flip, 1 - labels, labels)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def make_model(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=96,
                     max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(cfg)


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (Trainer's step begin to step end)."""

    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


class Passes:
    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


def run(kind, seed, steps, train, test, out_dir):
    model = make_model(seed)
    passes = Passes(model)
    clock = StepClock()
    out = os.path.join(out_dir, f"{kind}-seed{seed}")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, max_steps=steps,
                             learning_rate=3e-3, weight_decay=0.01, warmup_steps=10,
                             lr_scheduler_type="cosine", report_to="none", save_strategy="no",
                             logging_steps=steps, disable_tqdm=True, use_cpu=True, seed=seed)
    common = dict(model=model, args=args, train_dataset=train, callbacks=[clock])
    if kind == "AdamW":
        trainer = Trainer(**common)
    elif kind == "SAM":
        trainer = SAMTrainer(**common, sam="sam", sam_kwargs={"rho": 0.01})
    else:  # VaSSORe: reuse the perturbation when the outer-gradient norm looks flat
        trainer = SAMTrainer(**common, sam="vassore",
                             sam_kwargs={"rho": 0.01, "theta": 0.4, "criterion": "gSAMflat"})
    trainer.train()
    train_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    train_passes = passes.n
    model.eval()
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in test])
        labels = torch.stack([r["labels"] for r in test])
        accuracy = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
    return dict(accuracy=accuracy, loss=train_loss, ms=1e3 * statistics.median(clock.times[2:]),
                passes=train_passes / steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "out", "hf_trainer_demo"),
                        help="output directory (default: %(default)s, untracked)")
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    torch.set_num_threads(opts.threads)
    train, test = make_data(4096, 100, noise=0.2), make_data(1024, 200, noise=0.0)
    kinds = ["AdamW", "SAM", "VaSSORe"]
    results = {k: [] for k in kinds}
    for seed in opts.seeds:
        for kind in kinds:  # interleaved, so machine load affects each alike
            results[kind].append(run(kind, seed, opts.steps, train, test, opts.out))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {opts.steps} steps, seeds {opts.seeds}")
    print(f"{'optimizer':<9} {'test acc':>9} {'train loss':>11} {'ms/step':>8} {'÷ AdamW':>8} "
          f"{'passes/step':>12}")
    base = statistics.median(r["ms"] for r in results["AdamW"])
    for kind in kinds:
        rs = results[kind]
        ms = statistics.median(r["ms"] for r in rs)
        print(f"{kind:<9} {statistics.mean(r['accuracy'] for r in rs):>9.3f} "
              f"{statistics.mean(r['loss'] for r in rs):>11.4f} {ms:>8.1f} {ms / base:>8.2f} "
              f"{statistics.mean(r['passes'] for r in rs):>12.2f}")
    path = os.path.join(opts.out, "results.json")
    with open(path, "w") as f:
        json.dump({"settings": {k: v for k, v in vars(opts).items() if k != "out"},
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "results": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
