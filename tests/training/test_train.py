"""End to end per domain: train a tiny model on bundled data, reload the run, generate, check the files."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from Bio import SeqIO
from symusic import Score

from multiar.commands.generate import sample_to_files
from multiar.config import load_config
from multiar.run_folder import load_run
from multiar.training.module import warmup_cosine
from multiar.training.run import train

FAST = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.block_size=128",
    "data.batch_size=8",
    "trainer.val_check_interval=15",
    "trainer.limit_val_batches=4",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=5",
    "trainer.precision=32-true",
    "samples.every_n_steps=0",
]
DOCS = {"music": 40, "code": 40, "protein": 400, "image": 400}


def train_tiny(name, run_dir, steps=30, extra=()):
    cfg = load_config(
        "train",
        [
            f"domain={name}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={steps}",
            f"data.max_documents={DOCS[name]}",
            *FAST,
            *extra,
        ],
    )
    return train(cfg)


def test_train_then_generate_writes_valid_files(domain_name, tmp_path):
    run_dir = tmp_path / "run"
    result = train_tiny(domain_name, run_dir)
    assert result["steps"] == 30
    run = load_run(run_dir)
    # 30 steps must beat the uniform guess, ln(vocab_size): the model learned something real
    assert result["val/loss"] < math.log(run.domain.vocab_size) - 0.3
    assert result["val/ppl"] == pytest.approx(
        math.exp(result["val/loss"]), rel=1e-5
    )  # exp of the mean, not mean of exps
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "model.safetensors",
        "domain",
        "metrics.csv",
        "checkpoints",
    }
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model_config"]["vocab_size"] == run.domain.vocab_size

    out = tmp_path / "out"
    n = 4
    report = sample_to_files(
        load_config(
            "generate", [f"run={run_dir}", f"out={out}", f"n={n}", "max_new_tokens=60", "batch_size=3"]
        )
    )
    assert json.loads((out / "generate.json").read_text())["samples"] == n
    assert all(k.startswith(f"{domain_name}/") for k in report["metrics"])
    if domain_name == "protein":
        records = list(SeqIO.parse(out / "samples.fasta", "fasta"))
        assert len(records) == n and len({r.id for r in records}) == n
    elif domain_name == "music":
        assert len(list(out.glob("*.mid"))) == n
        for path in out.glob("*.mid"):
            Score(str(path))
    elif domain_name == "image":
        from PIL import Image as PILImage

        samples = sorted(out.glob("sample_*.png"))
        assert len(samples) == n and all(PILImage.open(p).size == (8, 8) for p in samples)
        assert (out / "grid.png").exists() and report["metrics"]["image/new_tokens_mean"] == 16
    else:
        assert len(list(out.glob("*.py"))) == n
        assert "samples parse" in (out / "syntax_report.tsv").read_text()
        assert 0.0 <= report["metrics"]["code/parse_rate"] <= 1.0


def test_same_seed_gives_identical_files(tmp_path):
    run_dir = tmp_path / "run"
    train_tiny("protein", run_dir, steps=10)
    texts = []
    for out in ("a", "b"):
        sample_to_files(
            load_config(
                "generate",
                [
                    f"run={run_dir}",
                    f"out={tmp_path / out}",
                    "n=3",
                    "seed=7",
                    "max_new_tokens=40",
                    "top_p=0.9",
                    "prompt=MKT",
                ],
            )
        )
        texts.append((tmp_path / out / "samples.fasta").read_text())
    assert texts[0] == texts[1]
    assert all(str(r.seq).startswith("MKT") for r in SeqIO.parse(tmp_path / "a" / "samples.fasta", "fasta"))


def test_existing_run_is_not_replaced_but_resumes_from_last(tmp_path, monkeypatch):
    from multiar.training.module import LitGPT

    run_dir = tmp_path / "run"
    train_tiny("protein", run_dir, steps=10)
    with pytest.raises(FileExistsError, match="ckpt_path=last"):
        train_tiny("protein", run_dir, steps=10)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    real, ran = LitGPT.training_step, []

    def counted(self, batch, batch_idx):
        ran.append(self.global_step)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LitGPT, "training_step", counted)
    resumed = train_tiny("protein", run_dir, steps=16, extra=["ckpt_path=last"])
    # a fresh start would also end at 16; a resume runs only steps 10..15
    assert resumed["steps"] == 16 and ran == list(range(10, 16))


def test_generate_refuses_to_overwrite_previous_samples(tmp_path):
    run_dir = tmp_path / "run"
    train_tiny("protein", run_dir, steps=5)
    args = [f"run={run_dir}", f"out={tmp_path / 'o'}", "n=2", "max_new_tokens=20"]
    sample_to_files(load_config("generate", args))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        sample_to_files(load_config("generate", args))
    sample_to_files(load_config("generate", [*args, "overwrite=true"]))


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_music_continues_a_midi_prompt(tmp_path):
    from conftest import bundled_files

    run_dir = tmp_path / "run"
    train_tiny("music", run_dir, steps=5)
    prompt = bundled_files("music", 1)[0]
    report = sample_to_files(
        load_config(
            "generate",
            [f"run={run_dir}", f"out={tmp_path / 'o'}", "n=2", "max_new_tokens=40", f"prompt={prompt}"],
        )
    )
    # the written file holds the (cut) prompt followed by the continuation
    midi = [f for f in report["files"] if f.endswith(".mid")]
    assert len(midi) == 2 and all(Score(f).note_num() > 0 for f in midi)


def test_long_prompt_is_cut_to_its_tail_and_written_whole(tmp_path):
    import torch

    from multiar.engine.decode import generate
    from multiar.engine.sampling import ban_tokens

    run_dir = tmp_path / "run"
    train_tiny("protein", run_dir, steps=3)  # block_size 128
    prompt = "".join("ACDEFGHIKLMNPQRSTVWY"[i * 7 % 20] for i in range(200))
    sample_to_files(
        load_config(
            "generate",
            [
                f"run={run_dir}",
                f"out={tmp_path / 'o'}",
                "n=1",
                "max_new_tokens=28",
                "temperature=0",
                f"prompt={prompt}",
            ],
        )
    )
    written = str(next(SeqIO.parse(tmp_path / "o" / "samples.fasta", "fasta")).seq)
    # the block holds the prompt's tail (no BOS: a training window past a document's first) + the new
    # tokens; the file holds the whole prompt + the new tokens
    run = load_run(run_dir)
    d = run.domain
    tail = d.prompt_ids(prompt)[1:][-(128 - 28) :]
    new = generate(
        run.model,
        torch.tensor([tail]),
        28,
        temperature=0.0,
        eos_id=d.eos_id,
        processors=[ban_tokens([d.pad_id, d.bos_id])],
    )[0]
    assert written == prompt + d.decode(new)[0]


def test_fit_prompt_cuts_a_long_prompt_to_a_training_like_tail():
    from multiar.commands.generate import fit_prompt

    prompt = [1, *range(10, 60)]  # BOS + 50 tokens
    assert fit_prompt(prompt, block_size=64, max_new_tokens=10) == prompt
    # too long: its last ids without BOS, as a training window past a document's first starts
    assert fit_prompt(prompt, block_size=32, max_new_tokens=12) == list(range(40, 60))
    # more new tokens than the block: the window will slide, the prompt keeps half the block
    assert fit_prompt(prompt, block_size=32, max_new_tokens=500) == list(range(44, 60))


def test_a_capped_warmup_says_what_it_uses(caplog):
    from types import SimpleNamespace

    from multiar.training.module import LitGPT

    optim = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 50, "min_lr_ratio": 0.1}
    module = LitGPT({"vocab_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8}, optim, 0)
    module._trainer = SimpleNamespace(estimated_stepping_batches=200, precision="32-true")
    with caplog.at_level("WARNING", logger="multiar"):
        schedule = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [r.getMessage() for r in caplog.records] == [
        "optim.warmup_steps=50 is capped at 10% of the 200 steps: 20 warmup steps used"
    ]
    assert schedule.lr_lambdas[0](19) == 1.0 and schedule.lr_lambdas[0](18) < 1.0  # 20 used, as said
    caplog.clear()
    module._trainer = SimpleNamespace(estimated_stepping_batches=1000, precision="32-true")  # 50 fits
    with caplog.at_level("WARNING", logger="multiar"):
        module.configure_optimizers()
    assert caplog.records == []


def test_the_optimizer_is_adamw_fused_on_cpu_and_steps_like_the_unfused_one():
    """configure_optimizers: fused AdamW where torch has it (CPU here), decay on matrices only; one step
    moves the weights as torch's plain AdamW with the same groups does (to float rounding)."""
    from types import SimpleNamespace

    import torch

    from multiar.training.module import LitGPT

    optim = {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 0, "min_lr_ratio": 0.1}
    torch.manual_seed(0)
    module = LitGPT({"vocab_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8}, optim, 0)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, precision="32-true")
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    plain = torch.optim.AdamW(
        [
            {**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]}
            for g in opt.param_groups
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    for g_fused, g_plain in zip(opt.param_groups, plain.param_groups, strict=True):
        g_plain["fused"] = None
        for p, q in zip(g_fused["params"], g_plain["params"], strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    opt.step()
    plain.step()
    for g_fused, g_plain in zip(opt.param_groups, plain.param_groups, strict=True):
        for p, q in zip(g_fused["params"], g_plain["params"], strict=True):
            assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize(("precision", "cap"), [("32-true", 0.01), ("bf16-mixed", 0.01), ("32-true", 1e6)])
def test_the_fused_optimizer_clips_as_clip_grad_norm_does(precision, cap):
    """With a fused optimizer, LitGPT clips by handing the norm's coefficient to the optimizer's kernel
    (grad_scale) instead of multiplying every gradient first; under bf16-mixed Lightning's AMP plugin
    would not clip at all. The fit's weights equal those of the same fit clipped by clip_grad_norm_
    before each step; the divisor at each step is that fit's norm over the cap where the cap binds (0.01),
    else 1 (1e6); the gradients the step left have at most the cap's norm; no divisor is left on the
    optimizer after a step."""
    import lightning as L
    import torch

    from multiar.training.module import LitGPT

    optim = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 1, "min_lr_ratio": 0.1}
    data = [torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fits = {}
    for way in ("in the kernel", "clip_grad_norm_"):
        torch.manual_seed(0)
        module = LitGPT(
            {"vocab_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}, optim, -1
        )
        divisors, norms = [], []
        if (
            way == "clip_grad_norm_"
        ):  # the reference: clip_grad_norm_ (its norm recorded), fused step unscaled

            def clip(
                optimizer,
                gradient_clip_val=None,
                gradient_clip_algorithm=None,
                module=module,
                divisors=divisors,
            ):  # noqa: ANN001
                total = torch.nn.utils.clip_grad_norm_(module.parameters(), gradient_clip_val)
                divisors.append(max(1.0, float(total) / gradient_clip_val))
        else:  # LitGPT's own, the divisor it set recorded

            def clip(  # noqa: ANN202
                optimizer,  # noqa: ANN001
                real=module.configure_gradient_clipping,  # noqa: ANN001
                divisors=divisors,  # noqa: ANN001
                **kwargs,  # noqa: ANN003
            ):
                real(optimizer, **kwargs)
                divisors.append(float(optimizer.grad_scale))

        module.configure_gradient_clipping = clip

        def after_step(*args, norms=norms, module=module, real=module.on_train_batch_end):  # noqa: ANN002
            grads = [p.grad for p in module.parameters() if p.grad is not None]  # as the step left them
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            real(*args)
            assert "grad_scale" not in module.trainer.optimizers[0].__dict__

        module.on_train_batch_end = after_step
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=cap, limit_val_batches=0)  # fmt: skip
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        assert trainer.optimizers[0].defaults["fused"] is True
        assert len(norms) == 3 and max(norms) <= cap * 1.001, way
        fits[way] = ([p.detach().clone() for p in module.parameters()], divisors)
    (ours, divisors), (reference, reference_divisors) = fits["in the kernel"], fits["clip_grad_norm_"]
    torch.testing.assert_close(divisors, reference_divisors, rtol=1e-4, atol=0)
    assert all(d > 1 for d in divisors) if cap < 1 else all(d == 1 for d in divisors)
    for p, q in zip(ours, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_loss_scaler_finds_no_clip_divisor_on_the_optimizer():
    """Under fp16's loss scaler (which multiplies any grad_scale it finds on the optimizer into its own)
    LitGPT's clipping hook takes Lightning's rule and leaves no grad_scale behind, not even a stale one."""
    import lightning as L
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    from multiar.training.module import LitGPT

    optim = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 1, "min_lr_ratio": 0.1}
    module = LitGPT({"vocab_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}, optim, -1)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    # Lightning turns 16-mixed into bf16-mixed on a CPU: the plugin a GPU's 16-mixed run has, set by hand
    module.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    optimizer.grad_scale = torch.tensor(5.0)  # stale
    module.configure_gradient_clipping(optimizer, None, None)
    assert "grad_scale" not in optimizer.__dict__
