"""SAMTrainer (sam_kernels.integrations.transformers) with the real transformers.Trainer, on
tiny models built from configs (random weights, no download) and data made here: each run is
compared with a hand-written loop of the same optimizer over the same batches, in the same
order (float64: 1e-10, or bitwise where nothing differs; float32/bf16: 1e-5)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import sam_kernels  # noqa: E402
from sam_kernels.integrations.transformers import SAMTrainer  # noqa: E402
from training_helpers import SCALE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SEQ = 7
VOCAB = 37


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Trainer's Accelerator state is a per-process singleton: start each test clean."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# ---------------------------------------------------------------------------- models and data
def tiny_bert(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=12,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def tiny_gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def classification_rows(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding
    labels = torch.randint(0, 3, (n,), generator=g)
    return Rows([{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
                 for i in range(n)])


def lm_rows(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    # position 0 is never a target of a causal LM; marking it -100 makes Trainer's token count
    # for num_items_in_batch (5.24 counts every label of GPT-2) the one the model's loss uses
    labels[:, 0] = -100
    return Rows([{"input_ids": ids[i], "labels": labels[i]} for i in range(n)])


def batches(dataset, size):
    """The dataset in order, `size` rows per batch, collated as Trainer does."""
    rows = [dataset[i] for i in range(len(dataset))]
    return [transformers.default_data_collator(rows[i:i + size])
            for i in range(0, len(rows), size)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                learning_rate=0.01, lr_scheduler_type="constant", max_grad_norm=0.0,
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                use_cpu=True, train_sampling_strategy="sequential", seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


# ---------------------------------------------------------------------------- reference loop
SPECS = {
    "SAM": (sam_kernels.SAM, dict(rho=0.05)),
    "ASAM": (sam_kernels.SAM, dict(rho=0.5, adaptive=True, eta=0.01)),
    "GSAM": (sam_kernels.GSAM, dict(rho=0.05, gsam_alpha=0.3)),
    "GAM": (sam_kernels.GAM, dict(grad_rho=0.03, grad_norm_rho=0.05)),
    "VaSSO": (sam_kernels.VaSSO, dict(rho=0.05, theta=0.5)),
    "VaSSORe": (sam_kernels.VaSSORe, dict(rho=0.05, theta=0.5, criterion="naive", k=2)),
    "VaSSOReMu": (sam_kernels.VaSSOReMu, dict(rho=0.05, theta=0.5, criterion="naive", k=2)),
}


def make_sam(name, model, base=torch.optim.AdamW, **kw):
    cls, hyper = SPECS[name]
    return cls(model.parameters(), base, model=model, **hyper, **kw)


def hand_loop(model, opt, data, scheduler=None, scaler=None, on_step=None, autocast=None):
    """The plain loop: per batch, the closure zeroes, runs the model (under `autocast`, a
    dtype, when given), backpropagates and returns the loss; returns the losses step()
    gave."""
    model.train()
    losses = []
    for t, batch in enumerate(data):
        if on_step is not None:
            on_step(t)

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = model(**batch).loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss.detach()

        losses.append(float(opt.step(closure)))
        skipped = False
        if scaler is not None:
            before = scaler.get_scale()
            scaler.update()
            skipped = scaler.get_scale() < before
        if scheduler is not None and not skipped:
            scheduler.step()
    return losses


def assert_weights(trained, expected, atol, rtol=0.0):
    for (k, a), b in zip(trained.state_dict().items(), expected.state_dict().values()):
        if atol == 0:
            assert torch.equal(a, b), f"{k} differs"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class PassCounter:
    """Counts forward calls of the model (one per micro-batch and pass)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.n += 1


# ---------------------------------------------------------------------------- tests
def test_core_import_does_not_import_integrations():
    code = ("import sys, sam_kernels, sam_kernels.integrations\n"
            "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", list(SPECS))
def test_trainer_equals_hand_loop_float64(tmp_path, name):
    """Way 1 (an optimizer instance), every algorithm, float64, 6 steps: the weights equal
    the hand-written loop's to 1e-10, and the logged loss is what step(closure) returned."""
    data = classification_rows(24)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    counter = PassCounter(model)
    opt = make_sam(name, model, lr=0.01)
    trainer = SAMTrainer(model=model, args=args(tmp_path), train_dataset=data,
                         optimizers=(opt, None))
    trainer.train()

    ref_opt = make_sam(name, reference, lr=0.01)
    ref_losses = hand_loop(reference, ref_opt, batches(data, 4))
    assert_weights(model, reference, atol=1e-10)
    # Trainer sums the logged loss in a float32 tensor
    assert logged_losses(trainer) == pytest.approx(ref_losses, rel=1e-6)
    gap = getattr(ref_opt, "last_surrogate_gap", None)  # where the optimizer reports one
    if gap is not None:
        assert trainer.state.log_history[-2]["surrogate_gap"] == pytest.approx(float(gap),
                                                                              rel=1e-9)
    # every pass ran on the model Trainer trains: 2 per step (GAM 4), VaSSORe skips pass 1
    inner = getattr(opt, "inner_steps", 6)
    per_step = 4 if name == "GAM" else 2
    assert counter.n == 6 * (per_step - 1) + inner
    if name in ("VaSSORe", "VaSSOReMu"):
        # naive, k=2, one warm-up step: steps 0, 1, 2, 4 compute pass 1
        assert opt.inner_steps == ref_opt.inner_steps == 4


def test_trainer_from_arguments_uses_trainers_optimizer(tmp_path):
    """Way 2: sam= + sam_kwargs=, the base optimizer from TrainingArguments (AdamW with
    Trainer's no-decay grouping: biases and LayerNorm weights without weight decay), a linear
    LR schedule; against a hand-written AdamW grouping and schedule."""
    data = classification_rows(24)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    a = args(tmp_path, optim="adamw_torch", weight_decay=0.3, adam_beta1=0.8,
             lr_scheduler_type="linear")
    trainer = SAMTrainer(model=model, args=a, train_dataset=data, sam="gsam",
                         sam_kwargs=dict(rho=0.05, gsam_alpha=0.3))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, sam_kernels.GSAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)

    no_decay = [p for n, p in reference.named_parameters() if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in reference.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    assert len(no_decay) > 0 and len(decay) > 0
    ref_opt = sam_kernels.GSAM([dict(params=decay, weight_decay=0.3),
                                dict(params=no_decay, weight_decay=0.0)], torch.optim.AdamW,
                               rho=0.05, gsam_alpha=0.3, model=reference, lr=0.01,
                               betas=(0.8, 0.999))  # eps: GSAM's own; AdamW's default 1e-8
    sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: max(0.0, (6 - t) / 6))
    hand_loop(reference, ref_opt, batches(data, 4), scheduler=sched)
    assert_weights(model, reference, atol=1e-10)
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay), len(no_decay)]


@pytest.mark.parametrize("name", ["SAM", "VaSSORe", "GSAM"])
def test_gradient_accumulation_equals_double_batch(tmp_path, name):
    """k=2 micro-batches of 2 per step, each pass over the same two micro-batches, equal
    one batch of 4 (float64, 1e-10)."""
    data = classification_rows(24)
    model = tiny_bert()
    # Trainer (5.x) skips its division by k for models whose forward takes **kwargs, expecting
    # them to normalise by num_items_in_batch; the sequence-classification loss does not, so
    # the plain Trainer would sum the micro-batch means. Declare it, as Trainer documents.
    model.accepts_loss_kwargs = False
    reference = copy.deepcopy(model)
    counter = PassCounter(model)
    opt = make_sam(name, model, lr=0.01)
    trainer = SAMTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=2,
                                                gradient_accumulation_steps=2),
                         train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 6
    ref_opt = make_sam(name, reference, lr=0.01)
    ref_losses = hand_loop(reference, ref_opt, batches(data, 4))
    assert_weights(model, reference, atol=1e-10)
    assert logged_losses(trainer) == pytest.approx(ref_losses, rel=1e-6)
    inner = getattr(opt, "inner_steps", 6)
    assert counter.n == 2 * (6 + inner)  # two micro-batches per pass


def test_causal_lm_accumulation_from_arguments(tmp_path):
    """GPT-2 (the loss normalised by the number of shifted tokens over the accumulated
    batch), way 2 with SGD from TrainingArguments, k=2: equals the batch of 4."""
    data = lm_rows(24)
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    a = args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             optim="sgd", learning_rate=0.1)
    trainer = SAMTrainer(model=model, args=a, train_dataset=data, sam="sam",
                         sam_kwargs=dict(rho=0.05))
    trainer.train()
    ref_opt = sam_kernels.SAM(reference.parameters(), torch.optim.SGD, rho=0.05,
                              model=reference, lr=0.1)
    hand_loop(reference, ref_opt, batches(data, 4))
    assert_weights(model, reference, atol=1e-10)


def test_max_grad_norm_clips_the_final_gradient(tmp_path):
    """args.max_grad_norm becomes the optimizer's: the final gradient is clipped (equal to
    SAM(max_grad_norm=...)), the logged grad_norm is its norm before clipping, and the run
    differs from one without clipping (so clipping was active)."""
    data = classification_rows(24)
    model = tiny_bert()
    reference, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    opt = make_sam("SAM", model, base=torch.optim.SGD, lr=0.5)
    trainer = SAMTrainer(model=model, args=args(tmp_path, max_grad_norm=0.05),
                         train_dataset=data, optimizers=(opt, None))
    trainer.train()

    ref_opt = make_sam("SAM", reference, base=torch.optim.SGD, lr=0.5, max_grad_norm=0.05)
    norms = []
    hand_loop(reference, ref_opt, batches(data, 4),
              on_step=lambda t: t and norms.append(float(ref_opt.last_grad_norm)))
    norms.append(float(ref_opt.last_grad_norm))
    assert_weights(model, reference, atol=1e-10)
    assert opt.max_grad_norm == 0.05
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(norms, rel=1e-9)
    assert min(norms) > 0.05
    hand_loop(unclipped, make_sam("SAM", unclipped, base=torch.optim.SGD, lr=0.5),
              batches(data, 4))
    assert not torch.allclose(next(unclipped.parameters()), next(model.parameters()))


@pytest.mark.parametrize("name, dtype", [("SAM", torch.float64), ("VaSSORe", torch.float64),
                                         ("SAM", torch.float32)])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, name, dtype):
    """save_steps=3, then a fresh trainer resumes from checkpoint-3: the weights after 6
    steps are bitwise those of the uninterrupted run in float64 (float32: to 1e-6),
    optimizer state included (AdamW moments + the algorithm's own "sam" entry)."""
    data = classification_rows(24)
    model = tiny_bert(dtype)
    start = copy.deepcopy(model)
    a = args(tmp_path / "run", save_strategy="steps", save_steps=3)
    trainer = SAMTrainer(model=model, args=a, train_dataset=data,
                         optimizers=(make_sam(name, model, lr=0.01), None))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "sam" in saved and saved["state"], "the base optimizer's and the algorithm's state"

    resumed = copy.deepcopy(start)  # weights are loaded from the checkpoint
    trainer2 = SAMTrainer(model=resumed, args=args(tmp_path / "resume"), train_dataset=data,
                          optimizers=(make_sam(name, resumed, lr=0.01), None))
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    assert trainer2.state.global_step == 6
    assert_weights(resumed, model, atol=0 if dtype == torch.float64 else 1e-6)
    assert not torch.equal(next(resumed.parameters()), next(start.parameters()))
    if name == "VaSSORe":
        assert trainer2.optimizer.optimizer.inner_steps == 4


def test_bf16_autocast(tmp_path):
    """bf16=True: Trainer's autocast (no scaler), float32 weights: equal to the hand loop
    under torch.autocast(bfloat16) to 1e-5, finite."""
    data = classification_rows(24)
    model = tiny_bert(torch.float32)
    reference = copy.deepcopy(model)
    opt = make_sam("SAM", model, lr=0.01)
    trainer = SAMTrainer(model=model, args=args(tmp_path, bf16=True), train_dataset=data,
                         optimizers=(opt, None))
    trainer.train()
    assert trainer.accelerator.scaler is None
    ref_opt = make_sam("SAM", reference, lr=0.01)
    hand_loop(reference, ref_opt, batches(data, 4), autocast=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_weights(model, reference, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.classifier.weight, tiny_bert(torch.float32).classifier.weight)


class ScaledTrainer(SAMTrainer):
    """The GradScaler path Trainer takes with fp16=True on a GPU. On a CPU Accelerate makes
    no scaler for fp16 (it runs fp32 silently), so the test gives the accelerator one."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE,
                                                       growth_interval=10_000)


class InfAt:
    """Backward hook: +inf gradient in forward-backward number `at` (counted from 0)."""

    def __init__(self, param, at):
        self.calls, self.at = 0, at
        param.register_hook(self)

    def __call__(self, grad):
        k, self.calls = self.calls, self.calls + 1
        return torch.full_like(grad, float("inf")) if k == self.at else grad


@pytest.mark.parametrize("bad_pass", [2, 3], ids=["pass1", "pass2"])
def test_grad_scaler_skips_exactly(tmp_path, bad_pass):
    """The accelerator's GradScaler becomes the optimizer's: an inf in pass 1 or 2 of step 1
    skips that update (weights, AdamW state), the scale backs off once, the LR scheduler does
    not step (as Trainer does); everything equals the hand loop with SAM(grad_scaler=)."""
    data = classification_rows(24)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    InfAt(model.classifier.weight, bad_pass)
    opt = make_sam("SAM", model, lr=0.01)
    trainer = ScaledTrainer(model=model, args=args(tmp_path, lr_scheduler_type="linear"),
                            train_dataset=data, optimizers=(opt, None))
    trainer.train()
    scaler = trainer.accelerator.scaler
    assert opt.grad_scaler is scaler and scaler.get_scale() == SCALE / 2

    InfAt(reference.classifier.weight, bad_pass)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10_000)
    ref_opt = make_sam("SAM", reference, lr=0.01, grad_scaler=ref_scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: max(0.0, (6 - t) / 6))
    hand_loop(reference, ref_opt, batches(data, 4), scheduler=sched, scaler=ref_scaler)
    assert_weights(model, reference, atol=1e-10)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert ref_opt.param_groups[0]["lr"] == pytest.approx(0.01 * 1 / 6)  # 5 of 6 steps
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_configuration_raises(tmp_path):
    data = classification_rows(8)
    model = tiny_bert()
    a = args(tmp_path)
    with pytest.raises(ValueError, match="needs a SAM-family optimizer"):
        SAMTrainer(model=model, args=a, train_dataset=data)
    with pytest.raises(TypeError, match="needs a sam_kernels optimizer"):
        SAMTrainer(model=model, args=a, train_dataset=data,
                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="both"):
        SAMTrainer(model=model, args=a, train_dataset=data, sam="sam",
                   optimizers=(make_sam("SAM", model, lr=0.1), None))
    with pytest.raises(ValueError, match="unknown SAM algorithm 'adam'"):
        SAMTrainer(model=model, args=a, train_dataset=data, sam="adam")
    with pytest.raises(ValueError, match="without sam="):
        SAMTrainer(model=model, args=a, train_dataset=data, sam_kwargs={"rho": 0.1})


# ---------------------------------------------------------------------------- DDP, 2 processes
WORLD = 2
DDP_STEPS = 3
DDP_LR, DDP_RHO = 0.5, 0.05


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out_dir):
    """One rank: SAMTrainer, then the plain Accelerate loop (recipe in the README), each with
    k=2 micro-batches of 2 rows per rank and step; saves the weights and the micro-batches
    this rank saw."""
    import contextlib

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from sam_kernels.integrations.accelerate import prepare as sam_prepare

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    data = classification_rows(WORLD * 4 * DDP_STEPS)
    seen, reductions = [], []

    def counting_allreduce(state, bucket):  # DDP's all-reduce of one gradient bucket, counted
        reductions.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    class Recording(SAMTrainer):
        def get_batch_samples(self, *a, **kw):
            window, n = super().get_batch_samples(*a, **kw)
            seen.append([{k: v.clone() for k, v in b.items()} for b in window])
            return window, n

        def training_step(self, model, *a, **kw):
            if not getattr(self, "_hooked", False):  # model: the DDP wrapper Trainer made
                model.register_comm_hook(None, counting_allreduce)
                self._hooked = True
            return super().training_step(model, *a, **kw)

    model = tiny_bert()
    model.accepts_loss_kwargs = False  # see test_gradient_accumulation_equals_double_batch
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=DDP_RHO, lr=DDP_LR)
    trainer = Recording(model=model, args=args(out_dir, per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2,
                                                  max_steps=DDP_STEPS, logging_steps=100),
                        train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert isinstance(opt.model, torch.nn.parallel.DistributedDataParallel)
    result = {"trainer": {k: v.clone() for k, v in model.state_dict().items()},
              "trainer_batches": seen, "trainer_reductions": len(reductions)}
    reductions.clear()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_bert()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=DDP_RHO, lr=DDP_LR,
                          model=model)
    loader = torch.utils.data.DataLoader(data, batch_size=2,
                                         collate_fn=transformers.default_data_collator)
    model, opt, loader = sam_prepare(accelerator, model, opt, loader)
    assert opt.optimizer.model is model and hasattr(model, "no_sync")
    model.register_comm_hook(None, counting_allreduce)
    micro, steps, seen = [], 0, []
    for batch in loader:
        micro.append(batch)
        with accelerator.accumulate(model):
            if accelerator.sync_gradients:
                def closure():
                    opt.zero_grad()
                    for j, mb in enumerate(micro):
                        last = j == len(micro) - 1
                        with contextlib.nullcontext() if last else accelerator.no_sync(model):
                            accelerator.backward(model(**mb).loss)  # divided by k
                opt.step(closure)
                seen.append(micro)
                micro, steps = [], steps + 1
    assert steps == DDP_STEPS
    result["accelerate"] = {k: v.clone() for k, v in
                            accelerator.unwrap_model(model).state_dict().items()}
    result["accelerate_batches"] = seen
    result["accelerate_reductions"] = len(reductions)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()


def _grads_at(model, values, micro_batches):
    """Mean gradient over `micro_batches` at weights `values` (plain autograd)."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)
    model.zero_grad(set_to_none=True)
    for mb in micro_batches:
        (model(**mb).loss / len(micro_batches)).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


def _simulate(rank_windows, per_rank_pass1=True):
    """SAM + SGD under DDP by hand: each rank perturbs with its own pass-1 gradient
    (averaged over ranks when per_rank_pass1 is False), the pass-2 gradients are averaged."""
    model = tiny_bert()
    w = [p.detach().clone() for p in model.parameters()]
    for t in range(DDP_STEPS):
        g1 = [_grads_at(model, w, windows[t]) for windows in rank_windows]
        if not per_rank_pass1:
            g1 = [[sum(gs) / WORLD for gs in zip(*g1)]] * WORLD
        g2 = []
        for r, windows in enumerate(rank_windows):
            norm = torch.sqrt(sum((g ** 2).sum() for g in g1[r]))
            e = [DDP_RHO * g / (norm + 1e-12) for g in g1[r]]
            g2.append(_grads_at(model, [a + b for a, b in zip(w, e)], windows[t]))
        w = [a - DDP_LR * sum(gs) / WORLD for a, *gs in zip(w, *g2)]
    return [n for n, _ in model.named_parameters()], w


def test_ddp_two_processes_pass1_per_rank(tmp_path):
    """2 gloo processes, k=2 micro-batches per rank and step: SAMTrainer and the plain
    Accelerate loop both equal the per-rank simulation (float64, 1e-10): pass 1 per rank,
    pass 2 averaged; and differ from a synchronised pass 1. DDP all-reduces once per step
    (the tiny model is one bucket): after the last micro-batch of pass 2, never in pass 1."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for run in ("trainer", "accelerate"):
        windows = [res[f"{run}_batches"] for res in results]
        # every row once, each rank its own rows
        ids = torch.cat([mb["input_ids"] for ws in windows for w in ws for mb in w])
        assert ids.shape[0] == WORLD * 4 * DDP_STEPS
        assert torch.equal(ids.unique(dim=0).shape[0] * torch.ones(()),
                           ids.shape[0] * torch.ones(()))
        assert [res[f"{run}_reductions"] for res in results] == [DDP_STEPS] * WORLD
        names, expected = _simulate(windows)
        for r in range(WORLD):
            for n, e in zip(names, expected):
                torch.testing.assert_close(results[r][run][n], e, atol=1e-10, rtol=0,
                                           msg=lambda m: f"{run} rank {r} {n}: {m}")
        _, synced = _simulate(windows, per_rank_pass1=False)
        gap = max((results[0][run][n] - s).abs().max().item() for n, s in zip(names, synced))
        assert gap > 1e-6, f"{run}: the per-rank pass 1 made no difference ({gap})"

# The recipes (docs/recipes.md) run as written in tests/test_docs.py.
