"""The coarse N:M prototype (``proto/coarse_amx.cpp``), speed only, for ``bench_coarse.py`` and
``bench_speed.py --coarse``: one EDSR body conv (64->64, 3x3) against the engine's per-channel N:M
kernels and dense PyTorch (``run_coarse``), and one residual block with the epilogue fused against
oneDNN's dense bf16 block (``run_coarse_block``).

"Coarse" N:M: the 16 output channels of a block keep the same N of every M input channels at each
kernel position (chosen here by the block's summed magnitudes), so the block's kept inputs form a
dense K axis an AMX tile product can use. Per-channel N:M (what nmrestore trains) keeps a different
set per output channel. Both keep N/M of the weights; only the pattern differs. The prototype is
compiled here with the machine's compiler and never used by nmrestore itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from nmrestore.runtime import csr_from_dense, load_kernel
from nmrestore.runtime.cpu_features import cpu_features
from nmrestore.runtime.kernel import find_compiler
from nmrestore.runtime.timing import interleaved
from nmrestore.sparsity import nm

SOURCE = Path(__file__).resolve().parent / "proto" / "coarse_amx.cpp"
LEFT, PAD_RIGHT = 32, 32  # zero columns left/right of the prototype's bf16 input rows


def build(folder: Path) -> ctypes.CDLL | str:
    """The compiled prototype, or why not."""
    features = cpu_features()
    if not (features.get("amx_tile") and features.get("amx_bf16")):
        return "the CPU has no AMX-BF16"
    compiler = find_compiler()
    if compiler is None:
        return "no C++ compiler"
    out = folder / "coarse_amx.so"
    cmd = [
        compiler,
        "-O3",
        "-march=native",
        "-fopenmp",
        "-shared",
        "-fPIC",
        "-std=c++17",
        "-o",
        str(out),
        str(SOURCE),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return f"compile failed: {done.stderr.strip().splitlines()[-1:]}"
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.coarse_conv3x3.restype = ctypes.c_int
    lib.coarse_conv3x3.argtypes = [p, i64, i64, i64, i64, i64, p, p, i64, i64, p, p, ctypes.c_int, p, p,
                                   ctypes.c_int]  # fmt: skip
    return lib


@contextlib.contextmanager
def prototype(what: str) -> Iterator[ctypes.CDLL | None]:
    """The compiled prototype for the length of the block, or None (and why, printed) when it
    cannot be built here."""
    with tempfile.TemporaryDirectory(prefix="nmrestore-coarse-") as folder:
        lib = build(Path(folder))
        if isinstance(lib, str):
            print(f"{what} skipped: {lib}")
            yield None
        else:
            yield lib


def coarse_weight(w: torch.Tensor, n: int, m: int, block: int = 16) -> torch.Tensor:
    """``w`` pruned to N:M with one mask per block of ``block`` output channels (summed |w| ranks)."""
    o, c, kh, kw = w.shape
    score = w.abs().view(o // block, block, c, kh, kw).sum(1, keepdim=True).expand(-1, block, -1, -1, -1)
    keep = nm.compute_ranks(score.reshape(o, c, kh, kw), m) < n
    return w * keep


def pack(wc: torch.Tensor, block: int = 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(kept-input index per block, padded to a multiple of 32; A tiles [16 o][32 k] bf16; kpad)."""
    o, c, _, kw = wc.shape
    blocks = []
    for b in range(o // block):
        wb = wc[b * block : (b + 1) * block]  # (16, C, 3, 3)
        kept = (wb != 0).any(0).permute(1, 0, 2)  # (kh, C, kw): the kernel's address order
        kh_i, c_i, kw_i = kept.nonzero(as_tuple=True)
        blocks.append((kh_i, c_i, kw_i))
    kpad = -(-max(len(k[0]) for k in blocks) // 32) * 32
    kidx = torch.zeros(o // block, kpad, dtype=torch.int32)
    apack = torch.zeros(o // block, kpad // 32, block, 32, dtype=torch.bfloat16)
    for b, (kh_i, c_i, kw_i) in enumerate(blocks):
        k = len(kh_i)
        idx = (kh_i * kw + kw_i) * c + c_i
        kidx[b, :k] = idx.int()
        kidx[b, k:] = int(idx[0])  # padded entries: a valid input, zero weight
        vals = torch.zeros(block, kpad)
        vals[:, :k] = wc[b * block : (b + 1) * block, c_i, kh_i, kw_i]
        apack[b] = vals.view(block, kpad // 32, 32).permute(1, 0, 2).to(torch.bfloat16)
    return kidx.contiguous(), apack.contiguous(), kpad


def padded_bf16(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) f32 -> the prototype's bf16 (row, channel, column) input with its zero border."""
    c, h, w = x.shape[1:]
    buf = torch.zeros(h + 3, c, LEFT + w + PAD_RIGHT, dtype=torch.bfloat16)
    buf[1 : h + 1, :, LEFT : LEFT + w] = x[0].permute(1, 0, 2).to(torch.bfloat16)
    return buf


def run_coarse(size: tuple[int, int], repeats: int, nms: tuple[str, ...]) -> list[dict[str, object]]:
    """Per N:M: ms of the prototype and of the contenders (interleaved), the prototype's speed-ups."""
    kernel = load_kernel()
    rows: list[dict[str, object]] = []
    with prototype("coarse prototype") as lib:
        if lib is None:
            return []
        h, w = size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 64, h, w, generator=g)
        weight = torch.randn(64, 64, 3, 3, generator=g) * 0.05
        bias = torch.randn(64, generator=g)
        xpad = padded_bf16(x)
        xb_cl = x.to(torch.bfloat16, memory_format=torch.channels_last)
        wb_cl = weight.to(torch.bfloat16, memory_format=torch.channels_last)
        geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
        for text in nms:
            n, m = (int(v) for v in text.split(":"))
            wc = coarse_weight(weight, n, m)
            kidx, apack, kpad = pack(wc)
            out = torch.empty(h, 64, w)  # (row, channel, column)

            def coarse(out: torch.Tensor = out, kidx: torch.Tensor = kidx, apack: torch.Tensor = apack,
                       kpad: int = kpad) -> int:  # fmt: skip
                return int(
                    lib.coarse_conv3x3(
                        xpad.data_ptr(), 64, h, w, xpad.shape[2], LEFT, kidx.data_ptr(), apack.data_ptr(),
                        64, kpad, bias.data_ptr(), None, 0, out.data_ptr(), None, torch.get_num_threads(),
                    )
                )  # fmt: skip

            if coarse() != 0:
                print("coarse prototype: AMX not permitted here")
                return []
            ref = F.conv2d(x.bfloat16().float(), wc.bfloat16().float(), bias, padding=1)[0]
            diff = float((out.permute(1, 0, 2) - ref).abs().max())
            runs = {"coarse AMX": coarse, "dense f32": lambda: F.conv2d(x, weight, bias, padding=1)}
            runs["dense bf16 (oneDNN)"] = lambda: F.conv2d(xb_cl, wb_cl, bias.bfloat16(), padding=1)
            if kernel is not None:
                wp = weight * (nm.compute_ranks(weight, m) < n)  # per-channel N:M, same N/M
                csr = csr_from_dense(wp)
                hf = kernel.conv2d(
                    x, csr.rowptr, csr.cin, csr.kpos, csr.values, bias, 64, *geometry, out_pad=(1, 1)
                )
                runs["per-channel f32 kernel"] = lambda hf=hf, csr=csr: kernel.conv2d(
                    hf, csr.rowptr, csr.cin, csr.kpos, csr.values, bias, 64, *geometry, out_pad=(1, 1)
                )
                if kernel.has_bf16:
                    v16 = csr.values.bfloat16()
                    hb = kernel.conv2d(x, csr.rowptr, csr.cin, csr.kpos, v16, bias, 64, *geometry,
                                       half_pad=(1, 1), half_only=True)  # fmt: skip
                    runs["per-channel bf16 kernel"] = lambda hb=hb, csr=csr, v16=v16: kernel.conv2d(
                        hb,
                        csr.rowptr,
                        csr.cin,
                        csr.kpos,
                        v16,
                        bias,
                        64,
                        *geometry,
                        half_pad=(1, 1),
                        half_only=True,
                    )
            t = interleaved(runs, repeats, warmup=1)
            row: dict[str, object] = {
                "N:M": text,
                "K kept/padded": f"{kpad if n == m else int((wc[:16] != 0).any(0).sum())}/{kpad}",
            }
            row |= {f"{k} ms": t.median(k) * 1e3 for k in runs}
            row |= {f"coarse vs {k}": t.speedup("coarse AMX", k) for k in runs if k != "coarse AMX"}
            row["max abs diff vs bf16 ref"] = f"{diff:.1e}"
            rows.append(row)
            print(row, flush=True)
    return rows


def run_coarse_block(size: tuple[int, int], repeats: int, nms: tuple[str, ...]) -> list[dict[str, object]]:
    """One EDSR residual block (conv, ReLU, conv, + skip; 64 channels), coarse against dense bf16.

    Coarse: the two convs on the prototype with the epilogue fused: the first writes only the bf16
    input of the second (ReLU applied), the second adds the f32 skip and writes the f32 block output
    and the bf16 input of the next block, as an engine would hand them over. Dense bf16: oneDNN's
    channels-last bf16 convs with the skip added in bf16 (the cheapest dense form: no f32 pass).
    Per N:M: ms of both (interleaved), the speed-up, and the coarse output's largest difference to
    an f32 reference on the bf16-rounded input and weights."""
    rows: list[dict[str, object]] = []
    with prototype("coarse block") as lib:
        if lib is None:
            return []
        h, w = size
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 64, h, w, generator=g)
        w1, w2 = (torch.randn(64, 64, 3, 3, generator=g) * 0.05 for _ in range(2))
        b1, b2 = (torch.randn(64, generator=g) * 0.1 for _ in range(2))
        xpad = padded_bf16(x)
        x_rows = x[0].permute(1, 0, 2).contiguous()  # (H, C, W): the f32 skip in the prototype's layout
        mid16, next16 = torch.zeros_like(xpad), torch.zeros_like(xpad)
        out = torch.empty(h, 64, w)
        xb = x.to(torch.bfloat16, memory_format=torch.channels_last)
        d1, d2 = (c.to(torch.bfloat16, memory_format=torch.channels_last) for c in (w1, w2))
        bb1, bb2 = b1.bfloat16(), b2.bfloat16()
        threads, width = torch.get_num_threads(), xpad.shape[2]

        def dense() -> torch.Tensor:
            return F.conv2d(F.relu(F.conv2d(xb, d1, bb1, padding=1)), d2, bb2, padding=1) + xb

        for text in nms:
            n, m = (int(v) for v in text.split(":"))
            c1, c2 = coarse_weight(w1, n, m), coarse_weight(w2, n, m)
            (k1, a1, p1), (k2, a2, p2) = pack(c1), pack(c2)

            def coarse(k1: torch.Tensor = k1, a1: torch.Tensor = a1, p1: int = p1, k2: torch.Tensor = k2,
                       a2: torch.Tensor = a2, p2: int = p2) -> None:  # fmt: skip
                lib.coarse_conv3x3(xpad.data_ptr(), 64, h, w, width, LEFT, k1.data_ptr(), a1.data_ptr(), 64, p1,
                                   b1.data_ptr(), None, 1, None, mid16.data_ptr(), threads)  # fmt: skip
                lib.coarse_conv3x3(mid16.data_ptr(), 64, h, w, width, LEFT, k2.data_ptr(), a2.data_ptr(), 64, p2,
                                   b2.data_ptr(), x_rows.data_ptr(), 0, out.data_ptr(), next16.data_ptr(),
                                   threads)  # fmt: skip

            coarse()
            xr = x.bfloat16().float()
            mid = F.relu(F.conv2d(xr, c1.bfloat16().float(), b1, padding=1)).bfloat16().float()
            ref = F.conv2d(mid, c2.bfloat16().float(), b2, padding=1) + x
            diff = float((out.permute(1, 0, 2) - ref[0]).abs().max())
            handed = float((next16[1 : h + 1, :, LEFT : LEFT + w].float() - out.bfloat16().float()).abs().max())
            t = interleaved({"coarse block": coarse, "dense bf16 block": dense}, repeats, warmup=1)
            rows.append({
                "N:M": text,
                "coarse block ms": t.median("coarse block") * 1e3,
                "dense bf16 (oneDNN) block ms": t.median("dense bf16 block") * 1e3,
                "coarse vs dense bf16": t.speedup("coarse block", "dense bf16 block"),
                "max abs diff vs f32 ref": f"{diff:.1e}",
                "hand-off = output": "yes" if handed == 0 else f"no ({handed:.1e})",
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _coarse_layers(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]:
    """Per pruned conv of a squashed model with coarse masks: (kidx, apack, kpad, bias)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and (module.weight == 0).any():
            kidx, apack, kpad = pack(module.weight.detach())
            layers[name] = (kidx, apack, kpad, module.bias.detach().contiguous())
    return layers


class CoarseEDSR:
    """EDSR-baseline with coarse masks run on the prototype: every pruned conv with its epilogue
    fused, bf16 hand-offs between convs (three buffers taking turns), the residual stream in f32
    (updated in place: each value's skip is read where its sum is written). PyTorch runs the rest:
    the first conv and the mean shifts in f32; the upsampler's pixel shuffle as one copy into a
    channels-last bf16 image, which the dense last conv reads on oneDNN (AMX) in bf16."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, h: int, w: int) -> None:
        self.lib, self.model, self.h, self.w = lib, model, h, w
        self.layers = _coarse_layers(model)
        self.blocks = len(model.body) - 1
        self.buf16 = [torch.zeros(h + 3, 64, LEFT + w + PAD_RIGHT, dtype=torch.bfloat16) for _ in range(3)]
        self.skip, self.stream, self.up = torch.empty(h, 64, w), torch.empty(h, 64, w), torch.empty(h, 256, w)
        self.threads = torch.get_num_threads()
        last = model.tail[1]
        self.last_w = last.weight.detach().to(torch.bfloat16, memory_format=torch.channels_last)
        self.last_b = last.bias.detach().to(torch.bfloat16)

    def conv(self, name: str, src: torch.Tensor, out_ch: int, residual: torch.Tensor | None, relu: bool,
             out: torch.Tensor | None, out16: torch.Tensor | None) -> None:  # fmt: skip
        kidx, apack, kpad, bias = self.layers[name]
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        done = self.lib.coarse_conv3x3(
            src.data_ptr(), 64, self.h, self.w, src.shape[2], LEFT, kidx.data_ptr(), apack.data_ptr(), out_ch,
            kpad, bias.data_ptr(), ptr(residual), int(relu), ptr(out), ptr(out16), self.threads,
        )  # fmt: skip
        if done != 0:
            raise RuntimeError("AMX is not permitted in this process")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w, model, b16 = self.h, self.w, self.model, self.buf16
        self.skip.copy_(model.head(model.sub_mean(x))[0].permute(1, 0, 2))
        b16[0][1 : h + 1, :, LEFT : LEFT + w].copy_(self.skip)
        src, mid, free = 0, 1, 2
        stream = self.skip  # block 0 adds the features; later blocks update self.stream in place
        for i in range(self.blocks):
            self.conv(f"body.{i}.body.0", b16[src], 64, None, True, None, b16[mid])
            self.conv(f"body.{i}.body.2", b16[mid], 64, stream, False, self.stream, b16[free])
            stream, src, free = self.stream, free, src
        self.conv(f"body.{self.blocks}", b16[src], 64, self.skip, False, None, b16[free])  # + the long skip
        self.conv("tail.0.0", b16[free], 256, None, False, self.up, None)
        # (H, 64 x 2 x 2, W) -> channels-last (2H, 2W, 64): conv channel c*4 + i*2 + j goes to (2y+i, 2x+j, c)
        hr = self.up.view(h, 64, 2, 2, w).permute(0, 2, 4, 3, 1).to(torch.bfloat16).reshape(1, 2 * h, 2 * w, 64)
        out = F.conv2d(hr.permute(0, 3, 1, 2), self.last_w, self.last_b, padding=1).float()
        return model.add_mean(out)


def run_coarse_model(size: tuple[int, int], repeats: int, nms: tuple[str, ...]) -> list[dict[str, object]]:
    """EDSR-baseline x2 with coarse masks on the prototype (:class:`CoarseEDSR`) against OpenVINO's
    default precision (AMX) on the same dense-with-zeros model, interleaved, outputs checked against
    PyTorch f32. Skipped without AMX or OpenVINO."""
    from nmrestore.export.peers import available_peers, open_peers
    from nmrestore.models import create_model
    from nmrestore.sparsity import NMConfig, sparsify_, squash_

    names, _notes = available_peers(("openvino",), ())
    rows: list[dict[str, object]] = []
    if "openvino" not in names:
        print("coarse model skipped: OpenVINO is not installed")
        return []
    with prototype("coarse model") as lib:
        if lib is None:
            return []
        h, w = size
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
        for text in nms:
            n, m = (int(v) for v in text.split(":"))
            torch.manual_seed(0)
            model = create_model("edsr_baseline", scale=2)
            sparsify_(model, NMConfig(n=n, m=m, out_block=16))
            model = squash_(model).eval()
            coarse = CoarseEDSR(lib, model, h, w)
            with torch.no_grad():
                ref = model(x)
            diff = float((coarse(x) - ref).abs().max())
            with open_peers(model, ["openvino"], torch.get_num_threads(), tuple(x.shape)) as peers:
                ov = next(p for p in peers if p.name == "openvino default")
                ov_diff = float((ov.run(x) - ref).abs().max())
                runs = {"coarse": lambda coarse=coarse: coarse(x), "openvino default": lambda ov=ov: ov.run(x)}
                t = interleaved(runs, repeats, warmup=1)
            rows.append({
                "N:M": text,
                "coarse model ms": t.median("coarse") * 1e3,
                "openvino default ms": t.median("openvino default") * 1e3,
                "coarse vs openvino default": t.speedup("coarse", "openvino default"),
                "coarse max abs diff": f"{diff:.1e}",
                "openvino default max abs diff": f"{ov_diff:.1e}",
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows
