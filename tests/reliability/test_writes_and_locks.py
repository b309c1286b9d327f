"""Writes that cannot destroy anything: the shared atomic writer, ONNX export under failure and
SIGKILL, ``infer`` never writing over its inputs, and the run-folder lock of ``train``."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nmrestore.cli.main import app
from nmrestore.engine.runlock import LOCK_NAME, RunInUseError, run_lock
from nmrestore.io_atomic import atomic_path, atomic_write_bytes, atomic_write_text
from tests.conftest import tiny_recipe_dict
from tests.reliability.helpers import (
    ROOT,
    cli_command,
    cli_env,
    fails_cleanly,
    image,
    is_root,
    listing,
    mode,
    run_cli,
    runner,
    tiny_checkpoint,
)

OLD = b"previous model, must survive"
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx is not installed")


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- the atomic writer


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        assert mode(tmp_path / "a.json") == mode(tmp_path / "plain") == 0o666 & ~umask
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), RuntimeError("writer bug")],
    ids=["ENOSPC", "KeyboardInterrupt", "RuntimeError"],
)
def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path: Path, failure: BaseException) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(OLD)
    with pytest.raises(type(failure)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of a new mod")  # a part is on disk when the failure comes
        raise failure
    assert target.read_bytes() == OLD
    assert _temps(tmp_path) == []


def test_a_full_disk_names_the_target_not_the_temp(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "out.png"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "out.png")


def test_a_folder_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.json").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path / "x.json", b"{}")


#: (file, pattern) pairs allowed to write without the shared writer, each with its reason.
ALLOWED = {
    ("io_atomic.py", "*"): "the writer itself",
    (
        "engine/trainer.py",
        'open(self.run_dir / "metrics.jsonl", "a")',
    ): "an append-only log (the run lock keeps it single-writer)",
    ("runtime/kernel.py", "(Path(tmp) / name).write_bytes(text)"): "the C++ sources in a private temp build folder",
    ("engine/runlock.py", "os.open("): "the lock file (flock, not data)",
}
WRITE = re.compile(
    r"\.write_text\(|\.write_bytes\(|open\([^)]*[\"'](?:w|wb|a|ab|x|w\+)[\"']|\.savefig\((?!f\b)|save_file\(|"
    r"mkstemp\(|torch\.save\(|np\.save\(|os\.open\(|shutil\.copy"
)


def test_every_file_write_in_the_package_goes_through_the_shared_writer() -> None:
    offenders = []
    src = ROOT / "src" / "nmrestore"
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if not WRITE.search(code) or (rel, "*") in ALLOWED:
                continue
            if any(rel == f and pattern in code for f, pattern in ALLOWED):
                continue
            if "save_file(tensors, str(tmp)" in code:  # safetensors writing into atomic_path's temp
                continue
            offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


# ----------------------------------------------------------------------------- ONNX export


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "best.safetensors")


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system")],
    ids=["disk-full", "read-only"],
)
@needs_onnx
def test_onnx_export_failing_mid_write_keeps_the_old_file(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError
) -> None:
    from nmrestore.export import onnx as onnx_export

    def half_then_fail(model: object, example: object, path: Path, opset: int) -> None:
        Path(path).write_bytes(b"\x08\x09" * 100)  # a truncated model on disk, then the failure
        raise failure

    monkeypatch.setattr(onnx_export, "_export", half_then_fail)
    target = tmp_path / "model.onnx"
    target.write_bytes(OLD)
    fails_cleanly(
        ["export", str(checkpoint), "--format", "onnx", "--out", str(target)], str(target), failure.strerror
    )
    assert target.read_bytes() == OLD and _temps(tmp_path) == []


@needs_onnx
def test_onnx_export_interrupted_keeps_the_old_file(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmrestore.engine.runner import model_from_checkpoint
    from nmrestore.export import onnx as onnx_export

    real = onnx_export._export

    def export_then_interrupt(model: object, example: object, path: Path, opset: int) -> None:
        real(model, example, path, opset)  # type: ignore[arg-type]
        assert Path(path).stat().st_size > 0
        raise KeyboardInterrupt  # Ctrl-C after the exporter wrote the temp, before the replace

    monkeypatch.setattr(onnx_export, "_export", export_then_interrupt)
    target = tmp_path / "model.onnx"
    target.write_bytes(OLD)
    model, _ = model_from_checkpoint(checkpoint)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model, target)
    assert target.read_bytes() == OLD and _temps(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["temp-created", "temp-written"])
@needs_onnx
def test_sigkill_during_onnx_export_leaves_the_old_file_intact(
    checkpoint: Path, tmp_path: Path, moment: str
) -> None:
    """A real ``nmrestore export`` subprocess, SIGKILLed the instant its temp file appears (or
    once the exporter has written into it, i.e. during the onnxruntime check)."""
    target = tmp_path / "model.onnx"
    target.write_bytes(OLD)
    proc = subprocess.Popen(
        cli_command("export", str(checkpoint), "--format", "onnx", "--out", str(target)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = None
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            temps = [tmp_path / name for name in _temps(tmp_path)]
            ready = temps and (
                moment == "temp-created" or any(t.exists() and t.stat().st_size > 0 for t in temps)
            )
            if ready:
                proc.send_signal(signal.SIGKILL)
                killed_at = [(t.name, t.stat().st_size if t.exists() else None) for t in temps]
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if killed_at is None:
        pytest.fail(f"the export finished (rc {proc.returncode}) before its temp file was seen")
    print(f"killed at {moment}: temp files {killed_at}")
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == OLD  # the previous model is untouched
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["best.json", "best.safetensors", "model.onnx"]  # no half model under any name


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 KiB filesystem (root only): the disk really fills up mid-write."""
    if not is_root() or sys.platform != "linux":
        pytest.skip("mounting a tmpfs needs root on Linux")
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@needs_onnx
def test_onnx_export_on_a_really_full_disk(checkpoint: Path, tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "model.onnx"
    target.write_bytes(OLD)
    message = fails_cleanly(
        ["export", str(checkpoint), "--format", "onnx", "--out", str(target)], str(target)
    )
    assert "No space left on device" in message or "no space" in message.lower()
    assert target.read_bytes() == OLD and _temps(tiny_tmpfs) == []


@pytest.mark.parametrize("opset", ["999", "16", "0", "-3"])
@needs_onnx
def test_export_refuses_an_unsupported_opset(checkpoint: Path, tmp_path: Path, opset: str) -> None:
    import onnx

    high = onnx.defs.onnx_opset_version()
    target = tmp_path / "m.onnx"
    fails_cleanly(
        ["export", str(checkpoint), "--format", "onnx", "--opset", opset, "--out", str(target)],
        f"opset {opset}",
        f"17 to {high}",
    )
    assert not target.exists() and _temps(tmp_path) == []


@needs_onnx
def test_export_refuses_one_past_the_newest_opset(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    high = onnx.defs.onnx_opset_version()
    fails_cleanly(
        ["export", str(checkpoint), "--format", "onnx", "--opset", str(high + 1)],
        "newer than the installed onnx",
    )


# ----------------------------------------------------------------------------- infer


@pytest.mark.parametrize("layout", ["out-is-the-input-folder", "out-via-a-symlink", "hard-link-in-out"])
def test_infer_never_writes_over_an_input(checkpoint: Path, tmp_path: Path, layout: str) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    source = image(photos / "x.png")
    out = photos
    if layout == "out-via-a-symlink":
        out = tmp_path / "link"
        out.symlink_to(photos)
    elif layout == "hard-link-in-out":
        out = tmp_path / "out"
        out.mkdir()
        os.link(source, out / "x.png")
    before = source.read_bytes()
    fails_cleanly(
        ["infer", str(checkpoint), str(source), "--out", str(out)], "would overwrite the input", "x.png"
    )
    assert source.read_bytes() == before


@pytest.mark.parametrize(
    ("names", "adaptive"),
    [
        (["a.png", "a.jpg"], False),
        (["a.png", "a.png"], False),
        (["sub1/a.png", "sub2/a.png"], False),
        (["x.png", "x_classmap.png"], True),
    ],
    ids=["png-and-jpg", "same-file-twice", "same-stem-two-folders", "adaptive-classmap-name"],
)
def test_infer_refuses_two_inputs_for_one_output_name(
    checkpoint: Path, tmp_path: Path, names: list[str], adaptive: bool
) -> None:
    paths = []
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        paths.append(image(tmp_path / name, seed=i) if not (tmp_path / name).exists() else tmp_path / name)
    out = tmp_path / "out"
    fails_cleanly(
        [
            "infer",
            str(checkpoint),
            *map(str, paths),
            "--out",
            str(out),
            *(["--adaptive"] if adaptive else []),
        ],
        "would both be written to",
    )
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_infer_creates_out_and_outputs_with_plain_permissions(
    checkpoint: Path, tmp_path: Path, umask: int
) -> None:
    source = image(tmp_path / "x.png")
    old = os.umask(umask)
    try:
        result = runner.invoke(
            app, ["infer", str(checkpoint), str(source), "--out", str(tmp_path / "new" / "out")]
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert mode(tmp_path / "new" / "out") == 0o777 & ~umask  # 0755 under the usual umask
    assert mode(tmp_path / "new" / "out" / "x.png") == 0o666 & ~umask  # 0644, like a plain open


# ----------------------------------------------------------------------------- the run lock


def _recipe(path: Path, steps: int) -> Path:
    path.write_text(
        yaml.safe_dump(tiny_recipe_dict(train={"steps": steps, "val_every": 10_000, "ckpt_every": 5}))
    )
    return path


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Another process holding the run folder's lock until its stdin closes."""
    code = (
        "import sys\nfrom nmrestore.engine.runlock import run_lock\n"
        f"with run_lock({str(folder)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_folder_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("the first run's recipe\n")
    holder = _holder(run)
    try:
        before = listing(run)
        time.sleep(0.05)  # so a touched file would get a new mtime
        recipe = _recipe(tmp_path / "r.yaml", 2)
        for extra in ([], ["--resume"]):
            fails_cleanly(
                ["train", str(recipe), "--out", str(run), "--no-progress", *extra],
                f"{run} is in use by another run (pid {holder.pid})",
            )
        assert listing(run) == before
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=30)
    with run_lock(run) as lock:  # released when its holder ends
        assert lock == run / LOCK_NAME and (run / LOCK_NAME).read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_two_real_train_processes_into_one_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", 100_000)
    first = subprocess.Popen(
        cli_command("train", str(recipe), "--out", str(run), "--no-progress"),
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run / "recipe.yaml").exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        recipe_before = (run / "recipe.yaml").read_bytes()
        second = run_cli("train", str(recipe), "--out", str(run), "--no-progress", "--set", "seed=9")
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [f"error: {run} is in use by another run (pid {first.pid})"], lines
        assert (run / "recipe.yaml").read_bytes() == recipe_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_lock(run):  # SIGKILL released the lock: no stale lock, --resume can go on
        pass


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run), pytest.raises(RunInUseError, match="in use by another run"), run_lock(run):
        pass  # flock locks open files: a second lock, even in the same process, is refused
