"""Faults, counted: kill -9 at seeded moments of training, conversion and the cache build, a rank lost under
torchrun, a launcher killed, two runs on one output dir, concurrent cache builds, damaged caches, a full disk
under the output dir, damaged checkpoints and fuzzed data. Every trial must end clean: an equal result after
resuming or rerunning, or one line naming the file and the fix. `make test` runs a few trials of each class;
`make test-faults` all of them, and prints the table (class x trials x outcome) at the end.

The kills are deterministic: tests/faultkill.py SIGKILLs the process at its N-th filesystem event (a file
opened for writing, a rename, a removal, a torch.save torn half-way), N drawn with a seeded RNG from the
events an uninterrupted run makes. The full sweep adds kills at seeded wall-clock times (any instruction).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import data
import parallel
import train_common as tc
import train_sft
from sft_fixtures import REPO, env, free_port, metrics, tiny_chat_model, to_argv, write_chat_data

FULL = pytest.mark.faults_full
KILLER = Path(__file__).resolve().parent / "faultkill.py"


def trials(short: int, full: int):
    """Trial indices: the first `short` in `make test`, the rest only in the full sweep."""
    return [pytest.param(i, id=f"t{i}") for i in range(short)] + \
           [pytest.param(i, id=f"t{i}", marks=FULL) for i in range(short, full)]


def count(fault_table, fault: str, outcome: str):
    fault_table.setdefault(fault, {})
    fault_table[fault][outcome] = fault_table[fault].get(outcome, 0) + 1


@pytest.fixture
def fault_table(request):
    return request.config.fault_table


def kill_tree(proc):
    """The process and every descendant (torchrun workers sit in sessions of their own), by pid."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_killed(cmd, root: Path, at: int, log: Path, timeout=180) -> subprocess.CompletedProcess:
    """cmd under faultkill.py, killed at event `at` under root."""
    e = {**env(), "FAULT_ROOT": str(root), "FAULT_AT": str(at), "FAULT_LOG": str(log)}
    log.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(KILLER), *map(str, cmd)], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    finally:
        kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def count_events(cmd, root: Path, tmp: Path) -> int:
    e = {**env(), "FAULT_ROOT": str(root), "FAULT_COUNT": str(tmp / "events")}
    result = subprocess.run([sys.executable, str(KILLER), *map(str, cmd)], env=e, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return int((tmp / "events").read_text())


def run_timed_kill(cmd, seconds: float, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(list(map(str, cmd)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out = proc.communicate()[0]
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def where(log: Path) -> str:
    return log.read_text() if log.exists() else "?"


# -- kill -9 during training ----------------------------------------------------------------------------------
STEPS = 5


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A tiny model, chat data, a built cache, and an uninterrupted reference run under faultkill (counting)."""
    root = tmp_path_factory.mktemp("faults_train")
    hf, native = tiny_chat_model(root)
    chat = write_chat_data(root / "chat.jsonl")
    setup = {"native": native, "data": chat, "cache": root / "cache", "root": root}
    ref = root / "ref"
    t0 = time.perf_counter()
    setup["events"] = count_events(train_cmd(setup, ref), ref, root)
    setup["seconds"] = time.perf_counter() - t0
    setup["ref"] = ref
    return setup


def train_flags(setup, out, **overrides):
    flags = {"ckpt_paths": setup["native"], "template_config": "chatml.yaml",
             "train_data_paths": f"jsonl:{setup['data']}", "output_dir": out, "max_seq_len": 96, "lr": 2e-3,
             "lr_scheduler": "cosine", "warmup_steps": 1, "micro_batch_size_per_gpu": 4, "train_steps": STEPS,
             "save_freq": 1, "max_checkpoints": 2, "data_cache_dir": setup["cache"], "seed": 42}
    flags.update(overrides)
    return to_argv(flags)


def train_cmd(setup, out, **overrides):
    return [REPO / "train_sft.py", *train_flags(setup, out, **overrides)]


def check_nothing_partial_looks_complete(out: Path):
    """What a killed run leaves: every checkpoints/step_* dir complete, and an output dir whose weights exist
    loads whole (weights, params.json, tokenizer)."""
    from model import Transformer
    from tokenize_chat import load_tokenizer

    for step_dir in parallel.checkpoint_dirs(out):
        parallel.check_checkpoint_files(step_dir)
        torch.load(step_dir / "extra_rank0.pt", weights_only=False)
    if (out / "consolidated.00.pth").exists():
        Transformer.from_pretrained(out)
        load_tokenizer(out)
        json.loads((out / "train_args.json").read_text())


def recover(setup, out) -> subprocess.CompletedProcess:
    """What a user does after a kill: --resume when a checkpoint exists, else start again (--overwrite when
    the killed run left files)."""
    if parallel.checkpoint_dirs(out):
        how = {"resume": True}
    elif out.exists() and any(p.name not in ("train_args.json", tc.LOCK_FILE) for p in out.iterdir()):
        how = {"overwrite": True}
    else:
        how = {}
    result = subprocess.run([sys.executable, *map(str, train_cmd(setup, out, **how))], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def assert_same_run(out: Path, ref: Path) -> float:
    """Steps 1..N once each, losses and final weights equal to the uninterrupted run's; the largest
    relative loss difference."""
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    a, b = [m["loss"] for m in metrics(out)], [m["loss"] for m in metrics(ref)]
    diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert diff <= 1e-7, (a, b)
    wa = torch.load(out / "consolidated.00.pth", weights_only=True)
    wb = torch.load(ref / "consolidated.00.pth", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
    return diff


def phase(log_text: str, out: Path) -> str:
    path = log_text.split(" ", 1)[-1]
    if "checkpoints" in path:
        return "killed in a checkpoint write"
    if not (out / "metrics.jsonl").exists() or not metrics(out):
        return "killed at start-up"
    if len(metrics(out)) == STEPS and "metrics.jsonl" not in path:
        return "killed in the final save"
    return "killed between steps"


@pytest.mark.parametrize("trial", trials(2, 40))
def test_kill9_training_at_a_seeded_event_then_resume(train_setup, tmp_path, trial, fault_table):
    at = random.Random(1300 + trial).randint(1, train_setup["events"])
    out, log = tmp_path / "run", tmp_path / "where.txt"
    killed = run_killed(train_cmd(train_setup, out), out, at, log)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    check_nothing_partial_looks_complete(out)
    what = phase(where(log), out)
    resumed = bool(parallel.checkpoint_dirs(out))
    recover(train_setup, out)
    diff = assert_same_run(out, train_setup["ref"])
    count(fault_table, "kill -9 training (seeded event)", f"{what}: {'resumed' if resumed else 'rerun'}, "
          f"equal (max rel loss diff {diff:.0e}, weights bitwise)")


@pytest.mark.parametrize("trial", trials(0, 12))
def test_kill9_training_at_a_seeded_time_then_resume(train_setup, tmp_path, trial, fault_table):
    seconds = random.Random(1400 + trial).uniform(0.5, train_setup["seconds"])
    out = tmp_path / "run"
    killed = run_timed_kill([sys.executable, *train_cmd(train_setup, out)], seconds)
    check_nothing_partial_looks_complete(out)
    resumed = bool(parallel.checkpoint_dirs(out))
    if killed.returncode == 0:  # it finished first: rerunning it with --resume must still give the run
        what = "finished before the kill"
    else:
        what = f"killed after {len(metrics(out)) if (out / 'metrics.jsonl').exists() else 0} steps"
    recover(train_setup, out)
    assert_same_run(out, train_setup["ref"])
    count(fault_table, "kill -9 training (seeded time)", f"{'resumed' if resumed else 'rerun'}, equal")


# -- kill -9 during conversion ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert_setup(train_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_convert")
    hf_dir = train_setup["root"] / "hf"
    refs = {"to_native": root / "ref_native", "to_hf": root / "ref_hf"}
    cmds = {"to_native": lambda out: [REPO / "convert.py", "--ckpt_paths", hf_dir, "--output_dir", out,
                                      "--precision", "fp32"],
            "to_hf": lambda out: [REPO / "convert.py", "--to_hf", "--ckpt_paths", train_setup["native"],
                                  "--output_dir", out, "--precision", "fp32"]}
    events = {k: count_events(cmds[k](refs[k]), refs[k], root) for k in cmds}
    return {"cmds": cmds, "refs": refs, "events": events}


def converted_tensors(out: Path, direction: str) -> dict | None:
    """The output's tensors if it looks like a checkpoint to its loader (params.json / config.json), else None."""
    if direction == "to_native":
        if not (out / "params.json").exists():
            return None
        from model import Transformer
        Transformer.from_pretrained(out)  # loads whole
        return torch.load(out / "consolidated.00.pth", weights_only=True)
    if not (out / "config.json").exists():
        return None
    from safetensors.torch import load_file
    json.loads((out / "config.json").read_text())
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("direction", ["to_native", "to_hf"])
@pytest.mark.parametrize("trial", trials(1, 12))
def test_kill9_convert_then_rerun(convert_setup, tmp_path, direction, trial, fault_table):
    at = random.Random(hash((direction, trial)) % 1000 + 1500 * trial).randint(1, convert_setup["events"][direction])
    out, log = tmp_path / "out", tmp_path / "where.txt"
    cmd = convert_setup["cmds"][direction](out)
    killed = run_killed(cmd, out, at, log)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    ref = converted_tensors(convert_setup["refs"][direction], direction)
    left = converted_tensors(out, direction)
    assert left is None or all(torch.equal(left[k], ref[k]) for k in ref)  # looks whole only when whole
    result = subprocess.run([sys.executable, *map(str, cmd)], env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    again = converted_tensors(out, direction)
    assert again.keys() == ref.keys() and all(torch.equal(again[k], ref[k]) for k in ref)
    assert not list(out.glob(".convert-*")), "a killed conversion's temp dir was left behind"
    count(fault_table, f"kill -9 convert.py {direction} (seeded event)",
          f"{'left a dir that looked whole' if left is not None else 'left nothing that looked whole'}; rerun equal")


# -- kill -9 during the cache build ----------------------------------------------------------------------------
SLOW_BUILD = """
import sys, time
sys.path.insert(0, {repo!r})
import data
real = data._tokenize_task
def slow(task):  # module level in __main__, so forked pool workers can run it
    time.sleep(0.05)
    return real(task)
data._tokenize_task = slow
data.CHUNK = 16
data.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def cache_setup(train_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_cache")
    src = write_chat_data(root / "chat.jsonl", n=400, seed=3)
    script = root / "slow_build.py"
    script.write_text(SLOW_BUILD.format(repo=str(REPO)))

    def cmd(cache, num_proc=1):
        return [script, "--ckpt_dir", train_setup["native"], "--template_config", "chatml.yaml",
                "--train_data_paths", f"jsonl:{src}", "--max_seq_len", "96", "--data_cache_dir", cache,
                "--num_proc", str(num_proc)]

    ref_cache = root / "ref_cache"
    t0 = time.perf_counter()
    events = count_events(cmd(ref_cache), ref_cache, root)
    seconds = time.perf_counter() - t0
    return {"cmd": cmd, "src": src, "ref": ref_cache, "events": events, "seconds": seconds,
            "native": train_setup["native"]}


def open_cache(setup, cache: Path):
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(setup["native"])
    return data.prepare_dataset([f"jsonl:{setup['src']}"], tok, load_template("chatml.yaml", tok), 96,
                                cache_dir=cache, num_proc=1, progress=False)


def assert_cache_equal(a, b):
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask) and np.array_equal(a.offsets, b.offsets)


def check_cache_dir(cache: Path):
    """Every dir a reader would take (not hidden) is a complete cache."""
    for d in cache.iterdir() if cache.exists() else []:
        if not d.name.startswith("."):
            assert data.cache_problem(d) is None, (d, data.cache_problem(d))


@pytest.mark.parametrize("trial", trials(2, 16))
def test_kill9_cache_build_then_rebuild(cache_setup, tmp_path, trial, fault_table):
    rng = random.Random(1600 + trial)
    cache, log = tmp_path / "cache", tmp_path / "where.txt"
    if trial % 2 == 0:  # at a seeded filesystem event, one process
        at = rng.randint(1, cache_setup["events"])
        killed = run_killed(cache_setup["cmd"](cache), cache, at, log)
        how = "seeded event"
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    else:  # at a seeded time, with a pool of tokenizer processes
        killed = run_timed_kill([sys.executable, *map(str, cache_setup["cmd"](cache, num_proc=2))],
                                rng.uniform(0.5, cache_setup["seconds"]))
        how = "seeded time, 2 worker processes"
    check_cache_dir(cache)
    built = open_cache(cache_setup, cache)
    assert_cache_equal(built, open_cache(cache_setup, cache_setup["ref"]))
    assert [p.name for p in cache.iterdir()] == [built.path.name], "a killed build's temp dir was left behind"
    count(fault_table, f"kill -9 cache build ({how})", "rebuilt, equal, no temp dir left")


# -- a rank lost, a launcher lost, a second run --------------------------------------------------------------
def worker_pids(launcher: subprocess.Popen) -> dict:
    workers = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "RANK" in p.environ():
                workers[int(p.environ()["RANK"])] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return workers


def read_until(proc, needle: str, timeout=180) -> str:
    seen, start = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        if time.time() - start > timeout:
            break
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-3000:]}")


def torchrun_cmd(setup, out, nproc, **overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), REPO / "train_sft.py", *train_flags(setup, out, **overrides)]


@pytest.mark.parametrize("trial", trials(1, 3))
def test_kill_one_rank_survivor_exits_clearly_then_resume(train_setup, tmp_path, trial, fault_table):
    steps = 12
    ref = tmp_path / "ref"
    train_sft.main(train_flags(train_setup, ref, train_steps=steps))
    out = tmp_path / "run"
    victim = trial % 2 == 0  # rank 1 (or rank 0)
    at_step = random.Random(1700 + trial).randint(2, 6)
    proc = subprocess.Popen(list(map(str, torchrun_cmd(train_setup, out, 2, train_steps=steps,
                                                       micro_batch_size_per_gpu=2))),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        read_until(proc, f"step {at_step}/")
        workers = worker_pids(proc)
        assert sorted(workers) == [0, 1]
        workers[1 if victim else 0].kill()
        t0 = time.time()
        rest = proc.communicate(timeout=60)[0]  # no hang: torchrun and the survivor are gone within a minute
        psutil.wait_procs(list(workers.values()), timeout=30)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers.values())
        elapsed = time.time() - t0
    finally:
        kill_tree(proc)
    assert proc.returncode != 0
    if victim:  # the survivor, rank 0, says what happened and the way back, in one line
        assert "train_sft.py: error (rank 0): lost another process of this run" in rest, rest[-3000:]
        assert "[rank0]: Traceback" not in rest
    check_nothing_partial_looks_complete(out)
    result = subprocess.run(list(map(str, torchrun_cmd(train_setup, out, 2, train_steps=steps, resume=True,
                                                       micro_batch_size_per_gpu=2))),
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    a, b = [m["loss"] for m in metrics(out)], [m["loss"] for m in metrics(ref)]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)  # 2 processes vs 1: summation order
    count(fault_table, "kill -9 one rank of 2 (torchrun)", f"rank {1 if victim else 0} killed: survivor exited "
          f"in {'<' if elapsed < 10 else ''}{max(10, round(elapsed))} s, resumed, losses equal to 1e-5")


def test_second_run_refused_and_workers_exit_with_their_launcher(train_setup, tmp_path, capsys, fault_table):
    """A live run holds its output dir: a second run on it is refused, naming the holder. torchrun's workers
    sit in their own sessions; when the launcher is killed they save a checkpoint and exit (SIGTERM from
    PR_SET_PDEATHSIG), releasing the dir, and the run resumes."""
    steps = 24
    ref = tmp_path / "ref"
    train_sft.main(train_flags(train_setup, ref, train_steps=steps, save_freq=0))
    out = tmp_path / "run"
    proc = subprocess.Popen(list(map(str, torchrun_cmd(train_setup, out, 1, train_steps=steps, save_freq=0))),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        read_until(proc, "step 2/")
        worker = worker_pids(proc)[0]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            train_sft.main(train_flags(train_setup, out, train_steps=steps, resume=True))
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert f"is in use by a live run (pid {worker.pid} on " in err, err
        proc.kill()  # the launcher only
        worker.wait(timeout=60)
        rest = proc.communicate(timeout=30)[0]
    finally:
        kill_tree(proc)
    # The worker saw SIGTERM: it saved where it was and said how to go on.
    assert parallel.checkpoint_dirs(out), rest[-2000:]
    train_sft.main(train_flags(train_setup, out, train_steps=steps, save_freq=0, resume=True))
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    a, b = [m["loss"] for m in metrics(out)], [m["loss"] for m in metrics(ref)]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))
    count(fault_table, "second run on a live run's output dir", "refused, holder's pid named")
    count(fault_table, "torchrun launcher kill -9", "worker saved a checkpoint and exited, resumed, equal")


# -- sharing a cache ---------------------------------------------------------------------------------------------
def test_two_processes_build_the_same_cache_at_once(cache_setup, tmp_path, fault_table):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, *map(str, cache_setup["cmd"](cache))], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    assert all(p.returncode == 0 for p in procs), results
    assert len([p for p in cache.iterdir()]) == 1, list(cache.iterdir())
    assert_cache_equal(open_cache(cache_setup, cache), open_cache(cache_setup, cache_setup["ref"]))
    count(fault_table, "two builds of one cache key at once", "both succeeded, one complete cache")


def test_two_trainers_share_a_fresh_cache_dir(train_setup, tmp_path, fault_table):
    cache = tmp_path / "cache"
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, *map(str, train_cmd(train_setup, o, data_cache_dir=cache))],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for o in outs]
    try:
        results = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    assert all(p.returncode == 0 for p in procs), [r[-2000:] for r in results]
    assert len(list(cache.iterdir())) == 1
    assert [m["loss"] for m in metrics(outs[0])] == [m["loss"] for m in metrics(outs[1])]
    count(fault_table, "two trainers sharing a fresh cache dir", "both succeeded, one cache, equal losses")


# -- damaged caches ----------------------------------------------------------------------------------------------
def damage(path: Path, how: str):
    if how == "truncated ids.bin":
        os.truncate(path / "ids.bin", (path / "ids.bin").stat().st_size - 4)
    elif how == "truncated mask.bin":
        os.truncate(path / "mask.bin", 0)
    elif how == "missing offsets.bin":
        (path / "offsets.bin").unlink()
    elif how == "missing meta.json":
        (path / "meta.json").unlink()
    elif how == "meta.json not JSON":
        (path / "meta.json").write_text('{"format_version": 2, "st')
    elif how == "meta.json max_seq_len edited":
        meta = json.loads((path / "meta.json").read_text())
        meta["max_seq_len"] = 4096
        (path / "meta.json").write_text(json.dumps(meta))
    elif how == "meta.json token count edited":
        meta = json.loads((path / "meta.json").read_text())
        meta["stats"]["tokens"] += 10
        (path / "meta.json").write_text(json.dumps(meta))
    elif how == "offsets.bin scrambled":
        offsets = np.fromfile(path / "offsets.bin", dtype=np.int64)
        offsets[1:-1] = offsets[1:-1][::-1]
        offsets.tofile(path / "offsets.bin")


DAMAGE = ["truncated ids.bin", "truncated mask.bin", "missing offsets.bin", "missing meta.json", "meta.json not JSON",
          "meta.json max_seq_len edited", "meta.json token count edited", "offsets.bin scrambled"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_cache_is_detected_and_rebuilt(cache_setup, tmp_path, how, capsys, fault_table):
    cache = tmp_path / "cache"
    shutil.copytree(cache_setup["ref"], cache)
    good = open_cache(cache_setup, cache_setup["ref"])
    path = cache / good.path.name
    damage(path, how)
    with pytest.raises(data.DataError, match=f"data cache {path} is damaged: .*delete the dir and rerun"):
        data.TokenizedDataset.open(path)  # opened directly: refused, naming the path and the fix
    capsys.readouterr()
    rebuilt = open_cache(cache_setup, cache)  # through prepare_dataset: rebuilt (it is derived data)
    assert f"data: cache {path} is damaged" in capsys.readouterr().err
    assert rebuilt.built and rebuilt.path == path
    assert_cache_equal(rebuilt, good)
    assert [p.name for p in cache.iterdir()] == [path.name]
    count(fault_table, "damaged cache", f"{how}: detected at open, rebuilt, equal")


# -- a full disk -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size under tmp_path (root can mount one); resize(kb) grows or shrinks it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")

    def resize(kb: int):
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(mnt)], check=True, capture_output=True)
    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def du_kb(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in path.rglob("*") if p.is_file())


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize("when", ["step checkpoint", "final save"])
def test_full_disk_is_one_line_and_the_previous_checkpoint_resumes(train_setup, tmp_path, small_disk, when, capsys,
                                                                   fault_table):
    mnt, resize = small_disk
    ref = tmp_path / "ref"
    flags = dict(max_checkpoints=0, train_steps=3)
    train_sft.main(train_flags(train_setup, ref, **flags))
    ckpt = du_kb(ref / "checkpoints" / "step_00000001")
    final = -(-(ref / "consolidated.00.pth").stat().st_size // 4096) * 4
    small = 128  # metrics, train_args, tokenizer files, the lock
    out = mnt / "run"
    # Room for one checkpoint and not two; or for both checkpoints and not the final weights.
    resize(small + ckpt + ckpt // 2 if when == "step checkpoint" else small + 2 * ckpt + final // 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_sft.main(train_flags(train_setup, out, **flags))
    assert exc.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    step = 2 if when == "step checkpoint" else 3
    what = f"the step {step} checkpoint" if when == "step checkpoint" else "the final model"
    assert f"could not write {what} to {out}" in line and "no space left on device" in line, line
    assert "MB, " in line and "MB are free there" in line
    assert f"step_0000000{step - 1} is intact: free space and rerun with --resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_0000000{s}" for s in range(1, step)]
    assert not (out / "consolidated.00.pth").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    resize(64 * 1024)  # space freed
    train_sft.main(train_flags(train_setup, out, resume=True, **flags))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(ref)]
    wa, wb = (torch.load(o / "consolidated.00.pth", weights_only=True) for o in (out, ref))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    count(fault_table, "full disk under the output dir", f"during the {when}: one line, previous checkpoint kept, "
          f"resumed, equal")


# -- damaged checkpoints -----------------------------------------------------------------------------------------
class Payload:
    """A pickle that runs code when loaded (weights_only must refuse it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


WEIGHTS_DAMAGE = ["truncated consolidated.00.pth", "random bytes", "pickle carrying code", "params.json n_layers 3",
                  "params.json dim 32", "params.json not JSON"]


@pytest.mark.parametrize("how", WEIGHTS_DAMAGE)
def test_damaged_weights_are_one_line_naming_the_file(train_setup, tmp_path, how, capsys, fault_table):
    bad = tmp_path / "bad"
    shutil.copytree(train_setup["native"], bad)
    weights, params = bad / "consolidated.00.pth", bad / "params.json"
    marker = tmp_path / "code_ran"
    if how == "truncated consolidated.00.pth":
        os.truncate(weights, weights.stat().st_size // 2)
    elif how == "random bytes":
        weights.write_bytes(random.Random(0).randbytes(4096))
    elif how == "pickle carrying code":
        torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload(marker)}, weights)
    elif how == "params.json not JSON":
        params.write_text("{oops")
    else:
        key, value = how.split()[1:]
        p = json.loads(params.read_text())
        p[key] = int(value)
        params.write_text(json.dumps(p))
    capsys.readouterr()
    for name, main in (("train_sft.py", train_sft.main), ("convert.py", None)):
        if main is not None:
            with pytest.raises(SystemExit) as exc:
                main(train_flags(train_setup, tmp_path / "out", ckpt_paths=bad, save_freq=0))
        else:
            import convert
            with pytest.raises(SystemExit) as exc:
                convert.main(["--to_hf", "--ckpt_paths", str(bad), "--output_dir", str(tmp_path / "hf")])
        assert exc.value.code == 1
        line = one_error_line(capsys.readouterr().err)
        named = params if how == "params.json not JSON" else weights  # a mismatch names both files
        assert str(named) in line and line.startswith(f"{name}: error"), line
        if how.startswith("params.json "):
            assert "params.json" in line, line
    assert not marker.exists(), "the pickled code ran"
    count(fault_table, "damaged input checkpoint", f"{how}: one line naming the file (trainer and converter)")


STEP_DAMAGE = ["missing shard", "truncated shard", "truncated .metadata", "truncated extra_rank0.pt"]


@pytest.mark.parametrize("how", STEP_DAMAGE)
def test_damaged_step_checkpoint_is_one_line_naming_the_file(train_setup, tmp_path, how, capsys, fault_table):
    out = tmp_path / "run"
    shutil.copytree(train_setup["ref"], out)
    step_dir = parallel.checkpoint_dirs(out)[-1]
    named = {"missing shard": "__0_0.distcp", "truncated shard": "__0_0.distcp", "truncated .metadata": ".metadata",
             "truncated extra_rank0.pt": "extra_rank0.pt"}[how]
    if how == "missing shard":
        (step_dir / named).unlink()
    else:
        os.truncate(step_dir / named, 100)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_sft.main(train_flags(train_setup, out, resume=True, train_steps=STEPS + 2))
    line = one_error_line(capsys.readouterr().err)
    assert str(step_dir / named) in line and "delete the dir to resume from the one before it" in line, line
    shutil.rmtree(step_dir)  # the fix the line gives
    train_sft.main(train_flags(train_setup, out, resume=True, train_steps=STEPS + 2))
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 3))
    count(fault_table, "damaged step checkpoint", f"{how}: one line naming the file; the fix resumes")


# -- fuzzed data -------------------------------------------------------------------------------------------------
CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n"]
WRONG = [None, 0, 1.5, True, [], {}, "", "x", [1], {"a": 1}, float("nan")]


def good_record(rng, kind):
    def text():
        words = ["add", "two", "numbers", "12", "is", "é", "漢字", "\t", " ", "\u2028", "😀", "\x00"] + CONTROL
        return "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 8)))

    turns = [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    if rng.random() < 0.3:
        turns.insert(0, {"role": "system", "content": text()})
    if kind == "sft":
        return {"messages": turns}
    if rng.random() < 0.5:
        return {"prompt": turns[-2]["content"], "chosen": text() + "a", "rejected": text() + "b"}
    return {"chosen": turns[:-1] + [{"role": "assistant", "content": text() + "a"}],
            "rejected": turns[:-1] + [{"role": "assistant", "content": text() + "b"}]}


def mutate(rng, record):
    """One seeded breakage somewhere in the record: a wrong type at any level, a missing key, a null, a lone
    surrogate, a wrong role."""
    paths = []

    def walk(x, path):
        paths.append(path)
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, path + [k])
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, path + [i])
    walk(record, [])
    path = rng.choice(paths)
    op = rng.choice(["type", "type", "delete", "surrogate", "role"])
    if not path:
        return rng.choice(WRONG + [[record]])
    parent = record
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "surrogate" and isinstance(parent[path[-1]], str):
        s = parent[path[-1]]
        parent[path[-1]] = s[:len(s) // 2] + rng.choice(["\ud800", "\udfff"]) + s[len(s) // 2:]
    elif op == "role" and isinstance(parent, dict) and "role" in parent:
        parent["role"] = rng.choice(["robot", "", "Assistant", "tool", "user "])
    else:
        parent[path[-1]] = rng.choice(WRONG)
    return record


def raw_line(rng, record) -> bytes:
    """The record as a jsonl line, or a broken line: invalid UTF-8, a BOM, a huge or deep line, an array."""
    # A lone surrogate can only travel as a \\u escape: ensure_ascii then, for such records.
    ascii_only = rng.random() < 0.5 or "\\ud8" in json.dumps(record) or "\\udf" in json.dumps(record)
    line = json.dumps(record, ensure_ascii=ascii_only, allow_nan=True).encode()
    r = rng.random()
    if r < 0.05:
        return line[:len(line) // 2] + b"\xff\xfe" + line[len(line) // 2:]
    if r < 0.08:
        return b"[" + line + b"]"
    if r < 0.10:
        return b"[" * 50000 + b"]" * 50000
    if r < 0.12:
        return line[:-1] + b', "pad": "' + b"x" * 2_000_000 + b'"}'
    if r < 0.14:
        return line[: rng.randint(1, len(line) - 1)]  # cut short
    return line


@pytest.fixture(scope="module")
def fuzz_tok(train_setup):
    from tokenize_chat import load_template, load_tokenizer

    tok = load_tokenizer(train_setup["native"])
    return tok, load_template("chatml.yaml", tok)


def check_docs(ds, records, kind, tok, template):
    """The cache holds, for each record in order, what the template gives its messages (the final response
    alone trained for preference pairs), and nothing a user typed became a control token: <|im_start|> and
    <|im_end|> appear once per message, and the trained <|im_end|>s are one per trained turn."""
    from tokenize_chat import record_conversations, tokenize_conversation

    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    convs = [c for r in records for c in record_conversations(r, kind)]
    assert len(convs) == len(ds.offsets) - 1
    for i, conv in enumerate(convs):
        ids, mask = (x.tolist() for x in ds.doc(i))
        ref_ids, ref_mask = tokenize_conversation(conv, tok, template)
        assert ids == ref_ids
        if kind == "sft":
            assert mask == ref_mask
        assert ids.count(start) == len(conv) and ids.count(end) == len(conv)
        trained_ends = sum(1 for t, m in zip(ids, mask) if m and t == end)
        assert trained_ends == (sum(m["role"] == "assistant" for m in conv) if kind == "sft" else 1)


@pytest.mark.parametrize("kind", ["sft", "preference"])
@pytest.mark.parametrize("trial", trials(1, 8))
def test_fuzzed_records_give_file_and_line_or_a_counted_drop(fuzz_tok, tmp_path, kind, trial, fault_table):
    tok, template = fuzz_tok
    rng = random.Random(1800 + 10 * trial + (kind == "preference"))
    outcomes = {}
    for case in range(60):
        lines = [json.dumps(good_record(rng, kind)).encode() for _ in range(rng.randint(0, 3))]
        at = rng.randint(0, len(lines))
        broken = rng.random() < 0.8
        record = mutate(rng, good_record(rng, kind)) if broken else good_record(rng, kind)
        lines.insert(at, raw_line(rng, record))
        if rng.random() < 0.05:
            lines = [b"\xef\xbb\xbf" + lines[0], *lines[1:]]  # a BOM opening the file
        path = tmp_path / f"{case}.jsonl"
        path.write_bytes(b"\n".join(lines) + (b"\n" if rng.random() < 0.8 else b""))
        try:
            ds = data.prepare_dataset([f"jsonl:{path}"], tok, template, 4096, kind=kind, cache_dir=tmp_path / "c",
                                      num_proc=1, progress=False)
        except data.DataError as e:
            msg = str(e)
            assert str(path) in msg, msg
            assert f"line {at + 1}:" in msg or "every one of the" in msg, (msg, at + 1)
            outcome = "error naming file and line" if "line" in msg else "error: every sample dropped (file named)"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            continue
        s = ds.stats
        assert s["samples_in"] == len(lines) and s["samples"] + sum(s["dropped"].values()) == s["samples_in"]
        if not s["dropped"]:
            records = [json.loads(line.removeprefix(b"\xef\xbb\xbf")) for line in lines if line.strip()]
            check_docs(ds, records, kind, tok, template)
        outcome = "kept, masks checked" if not s["dropped"] else f"counted drop {sorted(s['dropped'])}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    for outcome, n in outcomes.items():
        for _ in range(n):
            count(fault_table, f"fuzzed {kind} records", outcome)


EDGE_FILES = {
    "empty file": (b"", "the file is empty"),
    "blank lines only": (b"\n  \n\t\n", "the file is empty"),
    "a JSON array on one line": (b'[{"messages": []}]\n', "line 1: expected a JSON object, got list; a JSON array?"),
    "a pretty-printed JSON array": (b'[\n  {"messages": []}\n]\n', "line 1: malformed JSON"),
    "invalid UTF-8": (b'{"messages": "\xff"}\n', "line 1: not valid UTF-8"),
    "a lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", '
                         b'"content": "x"}]}\n', "line 1: message 0 (role user): content has an unpaired surrogate"),
    "nesting deeper than the stack": (b"[" * 100000 + b"]" * 100000 + b"\n", "line 1: JSON that Python cannot hold"),
    "an integer of 5000 digits": (b'{"messages": ' + b"1" * 5000 + b"}\n", "line 1: JSON that Python cannot hold"),
}


@pytest.mark.parametrize("name", list(EDGE_FILES))
def test_broken_files_name_file_and_line(fuzz_tok, tmp_path, name, fault_table):
    content, needle = EDGE_FILES[name]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as exc:
        data.prepare_dataset([f"jsonl:{path}"], *fuzz_tok, 512, cache_dir=tmp_path / "c", num_proc=1, progress=False)
    assert str(path) in str(exc.value) and needle in str(exc.value), str(exc.value)
    count(fault_table, "broken data files", f"{name}: error naming the file" + (" and line" if "line" in needle else ""))
