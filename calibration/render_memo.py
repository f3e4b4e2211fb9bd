"""What ONNX Runtime's ``quantize_static`` recomputes identically each time one graph is rendered again.

A sensitivity ranking renders the same prepared float graph with the same ranges, QDQ form and weight
range once per layer, changing only ``nodes_to_exclude`` / ``nodes_to_quantize``. Most of each render
(~1.1 of ~1.4 s on EfficientNet-Lite0, 2-vCPU AVX2 EPYC) is spent in three pure functions of the
weights and of those fixed settings, in Python, channel by channel:

* ``QDQQuantizer._calc_initializer_quant_params``: every weight's per-channel scale and zero point;
* ``QDQQuantizer._adjust_weight_scale_for_int32_bias``: the weight scale raised where the int32 bias
  would overflow (u8s8 form: a function of the weight scale, the input's scale and the bias);
* ``quant_utils.quantize_onnx_initializer`` (as ``qdq_quantizer`` calls it): the int8 weights.

:class:`WeightMemo` remembers their results, per tensor, while it is installed (:meth:`installed`
patches the three for the duration of one ``quantize_static`` call), so later renders of the same
graph look them up instead. The graph ``quantize_static`` writes is the same, byte for byte: every
decision about which tensors get Q/DQ pairs, which activations fold, which nodes stay float is still
ONNX Runtime's own, made on every render. A memo is valid for ONE prepared graph, range file, QDQ form
and weight range: make one per ranking (``edgetl.quantize.QdqRenderer`` does).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from typing import Any, Callable, Iterator

import numpy as np

# the three functions patched; their owner is resolved when installed (onnxruntime is imported lazily)
_CALC = "_calc_initializer_quant_params"
_ADJUST = "_adjust_weight_scale_for_int32_bias"
_QUANTIZE = "quantize_onnx_initializer"
LOCK = threading.RLock()  # the patch is process-wide: one quantize_static at a time while it is in place


def unsupported() -> str | None:
    """Why this ONNX Runtime cannot be memoized (a function missing), or None."""
    try:
        from onnxruntime.quantization import qdq_quantizer as qq
    except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
        return f"onnxruntime.quantization cannot be imported ({exc})"
    missing = [n for n in (_CALC, _ADJUST) if not callable(getattr(qq.QDQQuantizer, n, None))]
    missing += [] if callable(getattr(qq, _QUANTIZE, None)) else [f"qdq_quantizer.{_QUANTIZE}"]
    return f"this ONNX Runtime's QDQQuantizer has no {', '.join(missing)}" if missing else None


def _array_key(a: Any) -> tuple:
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


class WeightMemo:
    """Per-tensor results of the weight quantization of one graph in one setting (see the module)."""

    def __init__(self) -> None:
        self.params: dict[tuple, Any] = {}  # (tensor, type, axis, dtype) -> QuantizationParams
        self.adjusted: dict[tuple, tuple] = {}
        self.quantized: dict[tuple, Any] = {}  # -> the int8 TensorProto
        self.hits = 0  # lookups answered from the memo (0: nothing reused yet)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The three functions memoized for the duration (and the process-wide :data:`LOCK` held)."""
        from onnxruntime.quantization import qdq_quantizer as qq

        why = unsupported()
        if why:
            raise RuntimeError(why)
        with LOCK:
            saved = getattr(qq.QDQQuantizer, _CALC), getattr(qq.QDQQuantizer, _ADJUST), getattr(qq, _QUANTIZE)
            setattr(qq.QDQQuantizer, _CALC, self._calc(saved[0]))
            setattr(qq.QDQQuantizer, _ADJUST, self._adjust(saved[1]))
            setattr(qq, _QUANTIZE, self._quantize(saved[2]))
            try:
                yield
            finally:
                setattr(qq.QDQQuantizer, _CALC, saved[0])
                setattr(qq.QDQQuantizer, _ADJUST, saved[1])
                setattr(qq, _QUANTIZE, saved[2])

    def _calc(self, original: Callable) -> Callable:
        memo = self

        def calc(quantizer: Any) -> dict:
            def key(name: str) -> tuple:
                info = quantizer.tensors_to_quantize[name]
                return name, info.tensor_type, info.axis, info.data_type

            todo = {n: info for n, info in quantizer.tensors_to_quantize.items() if key(n) not in memo.params}
            found = {n: copy.deepcopy(memo.params[key(n)]) for n in quantizer.tensors_to_quantize if n not in todo}
            memo.hits += len(found)
            if todo:  # ONNX Runtime's own computation, on the tensors not seen yet
                every = quantizer.tensors_to_quantize
                quantizer.tensors_to_quantize = todo
                try:
                    fresh = original(quantizer)
                finally:
                    quantizer.tensors_to_quantize = every
                for n, p in fresh.items():
                    memo.params[key(n)] = copy.deepcopy(p)
                found.update(fresh)
            # ONNX Runtime's order (the tensors it quantizes, in the order its operators asked for them)
            return {n: found[n] for n in quantizer.tensors_to_quantize if n in found}

        return calc

    def _adjust(self, original: Callable) -> Callable:
        memo = self
        sig = inspect.signature(original)

        def adjust(quantizer: Any, *args: Any, **kwargs: Any) -> tuple:
            a = sig.bind(quantizer, *args, **kwargs).arguments
            k = (_array_key(a["input_scale"]), _array_key(a["weight_scale"]), a["weight_name"], a["bias_tp"].name,
                 bool(a["is_per_channel"]))
            if k in memo.adjusted:
                memo.hits += 1
            else:
                memo.adjusted[k] = copy.deepcopy(original(quantizer, *args, **kwargs))
            return copy.deepcopy(memo.adjusted[k])

        return adjust

    def _quantize(self, original: Callable) -> Callable:
        memo = self
        sig = inspect.signature(original)

        def quantize(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            w = a.pop("weight")
            k = (w.name, w.data_type, tuple(w.dims), w.ByteSize(),
                 *((n, _array_key(v) if isinstance(v, (np.ndarray, np.generic)) else v) for n, v in sorted(a.items())))
            if k in memo.quantized:
                memo.hits += 1
            else:
                memo.quantized[k] = original(*args, **kwargs)
            out = type(memo.quantized[k])()
            out.CopyFrom(memo.quantized[k])
            return out

        return quantize


__all__ = ["LOCK", "WeightMemo", "unsupported"]
