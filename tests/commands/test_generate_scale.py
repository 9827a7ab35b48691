"""`multiar generate` at scale: linear time and bounded memory (no output re-read or rewritten per
sample), a killed run resumed to the files an uninterrupted one writes, byte for byte, and the progress
line."""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from Bio import SeqIO
from conftest import QUIET_FILTERS, TINY, proteome_subset
from hooks import hooked_env

from multiar.commands import resume
from multiar.commands.generate import sample_to_files
from multiar.commands.progress import Progress
from multiar.config import load_config
from multiar.training.run import train

MULTIAR = Path(sys.executable).parent / "multiar"


@pytest.fixture(scope="module")
def protein_run(tmp_path_factory):
    """A tiny untagged protein run (what it samples does not matter here)."""
    tmp = tmp_path_factory.mktemp("scale")
    data = proteome_subset(tmp / "data", per_file=20)
    overrides = [*TINY, "domain=protein", f"data.paths=[{data}]", f"run_dir={tmp / 'run'}",
                 "trainer.max_steps=2", "trainer.val_check_interval=2"]  # fmt: skip
    train(load_config("train", overrides))
    return tmp / "run"


def generate(run, out, *overrides):
    cfg = load_config("generate", [f"run={run}", f"out={out}", "dtype=fp32", "progress=false", *overrides])
    return sample_to_files(cfg)


def files_of(out: Path) -> dict[str, bytes]:
    """Every file under out by relative path; generate.json without its time stamp."""
    found = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    report = json.loads(found.pop("generate.json"))
    report.pop("created")
    report["provenance"].pop("decode")  # how the layout was chosen (measured now, or read from the cache)
    found["generate.json"] = json.dumps(report, sort_keys=True).encode()
    return found


def test_no_output_is_read_back_while_sampling(protein_run, tmp_path, monkeypatch):
    """The quadratic cost was the FASTA re-read and rewritten whole per sample: nothing reads it now."""
    reads = []
    real = SeqIO.parse

    def parse(handle, *args, **kwargs):
        reads.append(str(handle))
        return real(handle, *args, **kwargs)

    monkeypatch.setattr(SeqIO, "parse", parse)
    report = generate(protein_run, tmp_path / "o", "n=40", "batch_size=8", "max_new_tokens=12", "rank_by=ppl",
                      "top=5", *QUIET_FILTERS)  # fmt: skip
    assert not [r for r in reads if "samples.fasta" in r]
    records = list(real(tmp_path / "o" / "samples.fasta", "fasta"))
    assert [r.id for r in records] == [f"multiar_{i:04d}" for i in range(40)] and report["samples"] == 40
    ranked = [r for r in records if "rank=" in r.description]
    assert len(ranked) == 5 == report["ranked"]  # the ranks, known at the end, are in the file too
    assert not (tmp_path / "o" / resume.JOURNAL).exists()  # a whole run leaves nothing to resume


def test_a_sample_depends_on_the_seed_and_its_index_alone(protein_run, tmp_path):
    """Each sample draws from its own generator of (seed, its index): the same seed gives the same
    sample i with batch_size 1, 4 and 7 (other neighbours, other batch boundaries), and the same
    files; a run of 4 is the start of a run of 8."""
    common = ["max_new_tokens=12", "filters.novelty=false", *QUIET_FILTERS]
    seqs, fastas = {}, {}
    for size in (1, 4, 7):
        generate(protein_run, tmp_path / f"b{size}", "n=9", f"batch_size={size}", *common)
        fasta = tmp_path / f"b{size}" / "samples.fasta"
        seqs[size], fastas[size] = [str(r.seq) for r in SeqIO.parse(fasta, "fasta")], fasta.read_bytes()
    assert seqs[1] == seqs[4] == seqs[7] and len(set(seqs[1])) > 1
    assert fastas[1] == fastas[4] == fastas[7]  # perplexities too
    generate(protein_run, tmp_path / "short", "n=4", "batch_size=4", *common)
    short = [str(r.seq) for r in SeqIO.parse(tmp_path / "short" / "samples.fasta", "fasta")]
    assert short == seqs[1][:4]


def test_a_resume_with_other_settings_or_of_a_finished_run_is_refused(protein_run, tmp_path):
    from multiar.errors import ConfigError

    common = ["n=4", "batch_size=2", "max_new_tokens=8", "filters.novelty=false"]
    generate(protein_run, tmp_path / "o", *common)
    with pytest.raises(ConfigError, match="finished run"):
        generate(protein_run, tmp_path / "o", *common, "resume=true")
    out = tmp_path / "o"
    resume.save(out, "another digest", None)
    (out / "generate.json").unlink()
    with pytest.raises(ConfigError, match="other settings"):
        generate(protein_run, out, *common, "resume=true")
    with pytest.raises(FileExistsError, match="resume=true goes on"):
        generate(protein_run, out, *common)


def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_one(protein_run, tmp_path):
    n, common = 3000, ["batch_size=50", "max_new_tokens=20", "rank_by=ppl", "top=10", "filters.novelty=false"]
    args = [f"run={protein_run}", "dtype=fp32", f"n={n}", *common]
    killed = tmp_path / "killed"
    # killed at half-way, just before it journals the batch whose files it has written (a kill between
    # the two): at a point the hook fixes, not one a poll of the journal catches in time
    env = hooked_env(MULTIAR_TEST_KILL_BEFORE_JOURNAL=str(n // 2))
    proc = subprocess.run(
        [str(MULTIAR), "generate", *args, f"out={killed}"], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    journal = killed / resume.JOURNAL
    state = pickle.loads(journal.read_bytes()[32:])["state"]
    assert n // 4 <= state.done < n and not (killed / "generate.json").exists()
    records = list(SeqIO.parse(killed / "samples.fasta", "fasta"))  # every record on disk is whole
    assert len(records) > state.done and all("length=" in r.description for r in records)  # a batch past it
    assert all(int(r.description.split("length=")[1].split()[0]) == len(r.seq) for r in records)

    # a kill during an atomic write leaves its temporary (CI once caught the journal's): planted here
    (killed / ".generate.resume.k1ll3d_x.tmp").write_bytes(b"half a journal")
    (killed / "notes.tmp").write_bytes(b"a user's file: kept")
    other_batches = [a if a != "batch_size=50" else "batch_size=64" for a in common]  # no longer matters
    generate(protein_run, killed, f"n={n}", *other_batches, "resume=true")
    generate(protein_run, tmp_path / "whole", f"n={n}", *common)
    resumed, whole = files_of(killed), files_of(tmp_path / "whole")
    assert resumed.pop("notes.tmp") == b"a user's file: kept"
    assert sorted(resumed) == sorted(whole)
    for name in whole:
        if name != "generate.json":
            assert resumed[name] == whole[name], name
    a, b = json.loads(resumed["generate.json"]), json.loads(whole["generate.json"])
    a["files"] = [Path(f).name for f in a["files"]]
    b["files"] = [Path(f).name for f in b["files"]]
    a["provenance"]["run"] = b["provenance"]["run"]
    assert a == b


def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, tty = io.StringIO(), Terminal()
    for stream in (plain, tty):
        bar = Progress(100, "protein samples", stream=stream, after=0.0)
        for done in range(0, 101, 5):
            bar.update(done, done * 20)
        bar.close()
    lines = plain.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and lines[-1].startswith("protein samples 100/100 (100%)")
    assert "tok/s" in lines[0] and "ETA" in lines[0]
    assert tty.getvalue().count("\n") == 1 and tty.getvalue().startswith("\r")
    quiet = io.StringIO()
    bar = Progress(100, stream=quiet, enabled=False, after=0.0)
    bar.update(100, 10)
    assert quiet.getvalue() == ""


def test_progress_counts_the_tokens_of_the_batch_still_being_drawn(protein_run, tmp_path, monkeypatch):
    """A batch's tokens went into the count only when the batch ended: a run of one batch showed 0 tok/s
    on every line."""
    import multiar.commands.generate as generate_command

    seen: list[tuple[int, int]] = []

    class Recorded(Progress):
        def update(self, done: int, tokens: int) -> None:
            seen.append((done, tokens))

    monkeypatch.setattr(generate_command, "Progress", Recorded)
    generate(
        protein_run, tmp_path / "out", "n=4", "batch_size=4", "max_new_tokens=12", "filters.novelty=false"
    )
    before_the_end = [(done, tokens) for done, tokens in seen if done < 4]
    assert before_the_end and all(tokens > 0 for _, tokens in before_the_end)


def peak_rss_and_seconds(run: Path, out: Path, n: int, *overrides: str) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of `multiar generate` for n samples, in a fresh process."""
    script = (
        "import resource, sys, time\n"
        "from multiar.commands.generate import sample_to_files\n"
        "from multiar.config import load_config\n"
        "started = time.perf_counter()\n"
        "sample_to_files(load_config('generate', sys.argv[1:]))\n"
        "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    args = [f"run={run}", f"out={out}", "dtype=fp32", "progress=false", f"n={n}", *overrides]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    seconds, rss = map(float, done.stdout.split()[-2:])
    return rss, seconds


def scale_check(run: Path, tmp_path: Path, small: int, large: int, ratio: float) -> None:
    common = ["batch_size=256", "max_new_tokens=20", "filters.novelty=false", "top=10", "rank_by=ppl"]
    rss_small, time_small = peak_rss_and_seconds(run, tmp_path / "small", small, *common)
    rss_large, time_large = peak_rss_and_seconds(run, tmp_path / "large", large, *common)
    print(f"n={small}: {rss_small:.0f} MB {1000 * time_small / small:.2f} ms/sample; "
          f"n={large}: {rss_large:.0f} MB {1000 * time_large / large:.2f} ms/sample")  # fmt: skip
    assert rss_large - rss_small < 200
    # the fixed start-up (imports, loading the run) is paid once: compare the per-sample rest
    assert time_large / large <= ratio * time_small / small + 0.002


def test_time_per_sample_and_memory_stay_flat_short(protein_run, tmp_path):
    scale_check(protein_run, tmp_path, 500, 2500, 2.5)  # loose: a shared CPU


@pytest.mark.slow
def test_time_per_sample_and_memory_stay_flat_at_20000(protein_run, tmp_path):
    scale_check(protein_run, tmp_path, 2000, 20000, 1.2)


def test_rss_is_measured_in_megabytes():
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 10  # Linux: kilobytes
    assert os.name == "posix"


def fasta_ranks(out: Path) -> list[tuple[float, int]]:
    """(ppl, rank) of every record of out/samples.fasta, in file order (rank 0: unranked)."""
    found = []
    for r in SeqIO.parse(out / "samples.fasta", "fasta"):
        words = dict(w.split("=", 1) for w in r.description.split() if "=" in w)
        found.append((float(words["ppl"]), int(words.get("rank", 0))))
    return found


def test_ranking_without_top_holds_no_sample_and_resumes(protein_run, tmp_path, monkeypatch):
    """rank_by=ppl without top ranks every passing sample from (ppl, index) pairs spilled to a file: the
    journal holds no sample and stays small, the ranks order the perplexities, no copies go to top/,
    and a run stopped half-way resumes to the same files."""
    import multiar.commands.generate as command

    common = [
        "n=40",
        "batch_size=8",
        "max_new_tokens=12",
        "rank_by=ppl",
        "filters.novelty=false",
        *QUIET_FILTERS,
    ]
    journals, real_save = [], resume.save
    monkeypatch.setattr(
        resume,
        "save",
        lambda out, digest, tally: journals.append(tally.best) or real_save(out, digest, tally),
    )
    report = generate(protein_run, tmp_path / "whole", *common)
    assert report["ranked"] == 40 and journals and not any(journals)  # no sample in any journal
    found = fasta_ranks(tmp_path / "whole")
    assert sorted(rank for _, rank in found) == list(range(1, 41))
    by_rank = [ppl for ppl, _ in sorted(found, key=lambda f: f[1])]
    assert by_rank == sorted(by_rank) and not (tmp_path / "whole" / "top").exists()
    assert not (tmp_path / "whole" / "generate.resume.ranks").exists()

    real_take, taken = command.take_batch, []

    def take_then_die(p, batch):
        if len(taken) == 3:
            raise KeyboardInterrupt  # after 3 whole batches, as a kill between batches
        real_take(p, batch)
        taken.append(batch)

    monkeypatch.setattr(command, "take_batch", take_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(protein_run, tmp_path / "stopped", *common)
    monkeypatch.setattr(command, "take_batch", real_take)
    generate(protein_run, tmp_path / "stopped", *common, "resume=true")
    stopped, whole = files_of(tmp_path / "stopped"), files_of(tmp_path / "whole")
    assert (
        stopped["samples.fasta"] == whole["samples.fasta"] and stopped["samples.csv"] == whole["samples.csv"]
    )


def test_novelty_search_over_two_workers_finds_what_one_finds(protein_run, tmp_path):
    common = ["n=24", "batch_size=12", "max_new_tokens=20", "filters.candidates=4"]
    one = generate(protein_run, tmp_path / "one", *common, "filters.workers=1")
    two = generate(protein_run, tmp_path / "two", *common, "filters.workers=2")
    assert (tmp_path / "one" / "samples.csv").read_bytes() == (tmp_path / "two" / "samples.csv").read_bytes()
    assert one["metrics"] == two["metrics"]


def test_a_journal_is_unpickled_only_when_signed_by_this_users_key(tmp_path, monkeypatch):
    import pickle

    from multiar.commands import resume
    from multiar.errors import ConfigError

    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "ran"

    class Planted:  # unpickling it would run code
        def __reduce__(self):
            return (marker.write_text, ("planted code ran",))

    out = tmp_path / "out"
    out.mkdir()
    (out / resume.JOURNAL).write_bytes(bytes(32) + pickle.dumps({"digest": "d", "state": Planted()}))
    with pytest.raises(ConfigError, match="not signed by multiar for this user"):
        resume.load(out, "d")
    assert not marker.exists()
    resume.save(out, "d", {"done": 3})
    assert resume.load(out, "d") == {"done": 3}
    with pytest.raises(ConfigError, match="other settings"):
        resume.load(out, "another digest")
    assert (tmp_path / "cache" / "journal.key").stat().st_mode & 0o777 == 0o600


def test_the_decode_layout_is_part_of_the_settings_a_resume_must_share():
    from omegaconf import OmegaConf

    from multiar.commands.resume import settings_digest

    cfg = OmegaConf.create({"run": "r", "seed": 1, "batch_size": 8})
    linear, packed = ({"dtype": "fp32", "layout": x, "how": "measured"} for x in ("linear", "packed"))
    assert settings_digest(cfg, linear) != settings_digest(cfg, packed)
    assert settings_digest(cfg, linear) == settings_digest(cfg, {**linear, "how": "cached", "step_ms": {}})
    assert settings_digest(cfg) == settings_digest(OmegaConf.create({**cfg, "batch_size": 3}))


def test_a_resume_refused_for_a_layout_this_cpu_cannot_run_names_both_cpus(tmp_path, monkeypatch):
    """A run journaled as bf16/packed on an AVX512 CPU, resumed where oneDNN packs no bf16 (the layout
    pinned from the journal becomes bf16/linear, so the digest differs): the one line names the journal's
    layout and CPU and this one's, not 'other settings' (pinning could not help there). On the journal's
    own CPU (or one it did not record) a layout that differs is another setting's doing."""
    from multiar.commands import resume
    from multiar.commands.tally import Tally
    from multiar.engine.precision import cpu_model
    from multiar.errors import ConfigError

    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path / "cache"))
    here = {"dtype": "bf16", "layout": "linear", "kernels": {}}

    def refused(cpu: str | None, decode: dict) -> str:
        tally = Tally({})
        tally.layout, tally.cpu = ("bf16", "packed"), cpu
        resume.save(tmp_path, "the killed run's digest", tally)
        with pytest.raises(ConfigError) as error:
            resume.load(tmp_path, "this run's digest", decode)
        assert "\n" not in str(error.value) and str(tmp_path / resume.JOURNAL) in str(error.value)
        return str(error.value)

    avx512 = "AMD EPYC (cpu family 25 model 17 stepping 1, flags 0a1b2c3d)"
    line = refused(avx512, here)
    assert f"bf16/packed on {avx512}; this CPU ({cpu_model()}) decodes it as bf16/linear" in line
    for cpu in (cpu_model(), None):  # this very CPU, or a journal from before CPUs were recorded
        line = refused(cpu, {"dtype": "fp32", "layout": "int8", "kernels": {}})
        assert "decoded as bf16/packed, this run as fp32/int8 (quantize= or compile= differ)" in line
        assert "CPU" not in line
    same = {"dtype": "bf16", "layout": "packed", "kernels": {}}  # same layout: another setting differs
    assert "other settings" in refused(avx512, same)


def test_a_stopped_quantized_run_resumes_to_the_uninterrupted_ones_files(protein_run, tmp_path, monkeypatch):
    """The journal records how the run decoded and on which CPU; a quantized run (layout int8, its
    kernels chosen per shape) and a compiled one resume with dtype= and layout= generate takes (a
    journaled "int8" or "linear, compiled" handed back as a layout raised ValueError before), and a
    quantized run keeps its journaled kernels though they are measured anew and come out otherwise."""
    import multiar.commands.generate as command
    import multiar.engine.layout as layout
    from multiar.commands.tally import Tally
    from multiar.engine.precision import cpu_model

    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path / "cache"))
    common = ["n=12", "batch_size=4", "max_new_tokens=10", "quantize=int8", *QUIET_FILTERS]
    generate(protein_run, tmp_path / "whole", *common)
    real_take, taken = command.take_batch, []

    def take_then_die(p, batch):
        if len(taken) == 1:
            raise KeyboardInterrupt  # after one whole batch, as a kill between batches
        real_take(p, batch)
        taken.append(batch)

    monkeypatch.setattr(command, "take_batch", take_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(protein_run, tmp_path / "stopped", *common)
    journal = pickle.loads((tmp_path / "stopped" / resume.JOURNAL).read_bytes()[32:])["state"]
    assert journal.layout == ("fp32", "int8") and journal.cpu == cpu_model() and journal.done == 4
    assert journal.kernels and resume.journaled_decode(tmp_path / "stopped") == (
        "auto",
        "auto",
        journal.kernels,
        False,
    )
    monkeypatch.setattr(command, "take_batch", real_take)
    # the measured choices gone and every shape now faster on the kernel the journal did not pick: pinned
    (tmp_path / "cache" / layout.CACHE_FILE).unlink()
    monkeypatch.setattr(
        layout,
        "layer_seconds",
        lambda layers, _: {
            n: 1.0 if journal.kernels[n.rsplit(" ", 1)[0]] == n.rsplit(" ", 1)[1] else 0.1 for n in layers
        },
    )
    # and the whole model faster on those picks where they mix in bf16 copies (quantized_kernels.choose_kernels)
    monkeypatch.setattr(
        layout,
        "decode_step_seconds",
        lambda models, batch_size: {n: 0.5 if n.endswith("per shape") else 1.0 for n in models},
    )
    generate(protein_run, tmp_path / "stopped", *common, "resume=true")
    stopped, whole = files_of(tmp_path / "stopped"), files_of(tmp_path / "whole")
    assert (
        stopped["samples.fasta"] == whole["samples.fasta"] and stopped["samples.csv"] == whole["samples.csv"]
    )
    resumed = json.loads((tmp_path / "stopped" / "generate.json").read_text())["provenance"]["decode"]
    assert resumed["kernels"] == journal.kernels and resumed["how"] == "forced"
    generate(protein_run, tmp_path / "remeasured", *common)  # a new run takes the new timings
    fresh = json.loads((tmp_path / "remeasured" / "generate.json").read_text())["provenance"]["decode"]
    shapes = {s: k for s, k in journal.kernels.items() if s != "int8 prefill"}  # the prefill rule: as timed
    assert fresh["how"] == "measured" and all(fresh["kernels"][s] != k for s, k in shapes.items())
    compiled = Tally({})
    compiled.layout = ("bf16", "linear, compiled")
    (tmp_path / "compiled").mkdir()
    resume.save(tmp_path / "compiled", "d", compiled)
    # a float journal without kernels: from before the float rows rule, so {} pins F.linear's calls
    assert resume.journaled_decode(tmp_path / "compiled") == ("bf16", "linear", {}, True)


def test_compile_auto_weighs_the_jobs_tokens_and_a_resume_keeps_what_it_decided(
    protein_run, tmp_path, monkeypatch
):
    """compile=auto (the default) is handed the job's most decode steps (batches x max_new_tokens); what it
    decided is in generate.json and the journal, and a resumed run decodes as the killed one did though
    the rest of the job alone would not have compiled. The compiler is a recorder (the numerics of a
    compiled step are tests/engine/test_quantize.py's)."""
    import multiar.commands.generate as command
    import multiar.engine.compile_choice as compile_choice
    import multiar.engine.decode as decode
    from multiar.errors import ConfigError

    monkeypatch.setenv("MULTIAR_CACHE", str(tmp_path / "cache"))
    compiled = []

    def record(model, **kw):
        compiled.append(kw)
        model.compiled_step = SimpleNamespace(gemms={"gemms": "aten"})  # as a package step's first call picks
        return model

    monkeypatch.setattr(decode, "compile_for_sampling", record)
    common = ["n=4", "batch_size=2", "max_new_tokens=6", *QUIET_FILTERS]
    short = generate(protein_run, tmp_path / "short", *common)["provenance"]["decode"]
    assert (
        compiled == [] and short["compile"]["compile"] is False and short["compile"]["steps"] == 12
    )  # 2 batches x 6
    assert "compiled_gemms" not in short
    monkeypatch.setattr(compile_choice, "FIRST_COMPILE_S", 0.0)  # as if compiling cost nothing: it pays
    real_take, taken = command.take_batch, []

    def take_then_die(p, batch):
        if taken:
            raise KeyboardInterrupt  # after one whole batch
        real_take(p, batch)
        taken.append(batch)

    monkeypatch.setattr(command, "take_batch", take_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(protein_run, tmp_path / "stopped", *common)
    assert len(compiled) == 1 and compiled[0]["rows"] == 2 and compiled[0]["gemms"] is None  # measured
    journal = pickle.loads((tmp_path / "stopped" / resume.JOURNAL).read_bytes()[32:])["state"]
    assert journal.layout == ("fp32", "linear, compiled")
    monkeypatch.setattr(command, "take_batch", real_take)
    monkeypatch.setattr(compile_choice, "FIRST_COMPILE_S", 1e9)  # now it would never pay
    resumed = generate(protein_run, tmp_path / "stopped", *common, "resume=true")["provenance"]["decode"]
    assert len(compiled) == 2 and resumed["layout"] == "linear, compiled" and resumed["how"] == "forced"
    assert compiled[1]["rows"] == 2 and compiled[1]["on_failure"] is not None  # as auto compiled it
    assert resumed["compile"]["resumed"] and resumed["compile"]["compile"]
    assert resumed["compiled_gemms"] == {"gemms": "aten"}  # generate.json says which GEMMs the step ran
    assert compiled[1]["gemms"] == "aten"  # journaled after the killed run's first batch: pinned
    stopped, whole = files_of(tmp_path / "stopped"), files_of(tmp_path / "short")
    assert stopped.pop("generate.json") != whole.pop("generate.json")  # its own folder named in it
    assert stopped == whole  # the recorder compiles nothing: the same samples
    # a quantized run compiled by auto resumes too (its kernels journaled as the graph runs them)
    monkeypatch.setattr(compile_choice, "FIRST_COMPILE_S", 0.0)
    monkeypatch.setattr(command, "take_batch", take_then_die)
    taken.clear()
    with pytest.raises(KeyboardInterrupt):
        generate(protein_run, tmp_path / "int8", *common, "quantize=int8")
    journaled_rule = resume.journaled_decode(tmp_path / "int8")[2]["int8 prefill"]  # engine.quantized_prefill
    monkeypatch.setattr(command, "take_batch", real_take)
    monkeypatch.setattr(compile_choice, "FIRST_COMPILE_S", 1e9)
    int8 = generate(protein_run, tmp_path / "int8", *common, "quantize=int8", "resume=true")
    assert int8["provenance"]["decode"]["layout"] == "int8, compiled" and len(compiled) == 4
    kernels = int8["provenance"]["decode"]["kernels"]
    assert kernels.pop("int8 prefill") == journaled_rule and set(kernels.values()) == {"int8"}
    with pytest.raises(ConfigError, match="compile: must be auto, true or false"):
        load_config("generate", ["run=x", "compile=sometimes"])
    with pytest.raises(ConfigError, match="layout: packed does not compile"):
        load_config("generate", ["run=x", "compile=true", "layout=packed"])
    assert load_config("generate", ["run=x", "compile=false", "layout=packed"]).layout == "packed"
