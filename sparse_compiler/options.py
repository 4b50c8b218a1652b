"""`Options`: every knob of the `sparsify` backend, its default and its validation.

Pass them as ``torch.compile(model, backend="sparsify", options={...})`` or as keyword arguments of
``sparse_compiler.report``. An unknown key or a bad value raises an error that names it and says what
is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Options"]


@dataclass(frozen=True)
class Options:
    """Options of the ``sparsify`` backend.

    Attributes:
        enabled: rewrite anything at all; ``False`` compiles exactly as the plain Inductor backend.
        density: ``None`` (default): the cost model chooses each layer's density (or leaves it
            dense) to minimise the predicted time to reach the dense model's loss. A number forces
            that target density on every eligible layer: each gets the flat butterfly
            configuration whose density is nearest (``layouts.nearest_flat_butterfly``).
        block_size: side of a kept or dropped block; in/out features must be multiples of it.
            ``None``: the hardware block of the active profile (and twice it, when the cost model
            chooses).
        butterfly_size, n_factors: set both to force one flat butterfly configuration everywhere
            instead of deriving it from ``density``.
        global_size: rows and columns of every weight kept whole (Pixelated Butterfly's global part).
        shuffle: bit-reversal shuffle of the butterfly grid's columns. ``None`` (default): shuffle
            exactly the butterflies that would not mix all features (fewer than
            ``log2(butterfly_size)`` factors: block-diagonal in super-blocks of ``2^n_factors``
            cells, so stacked layers would never mix across them); ``True``: always; ``False``:
            never.
        include, exclude: ``fnmatch`` globs over module names (``"blocks.*.mlp.*"``); a layer is
            considered when it matches some ``include`` glob and no ``exclude`` glob.
        min_features: layers whose ``min(in_features, out_features)`` is smaller stay dense
            (0: no floor; the cost model already leaves layers dense where sparsity does not pay).
        allow_shared_weights: sparsify a weight that other nodes also use (tied embeddings); off by
            default, since zeroing blocks of an embedding table is rarely what anyone wants.
        rescale_init: after zeroing the dropped blocks, scale each block-row by
            ``sqrt(blocks per row / kept blocks in that row)`` so a freshly initialised layer keeps
            its output variance. Right for training from scratch (the default); set ``False`` when
            sparsifying a trained model, whose kept weights should stay as they are.
        keep_found_layouts: a weight whose entirely-zero blocks are exactly the dropped blocks of a
            layout this backend makes (a checkpoint of a model it made sparse) keeps that layout,
            whatever ``density`` or the cost model would choose now (``layouts/found.py``), so a
            resumed or served checkpoint computes what it was trained to. ``False`` plans such
            weights afresh (and masks them with the new layout).
        report: ``True`` prints the report table at compile time; a path ending in ``.json``,
            ``.md``, ``.html`` or ``.txt`` writes it there.
        eager: run the rewritten graph eagerly instead of handing it to Inductor (debugging).
        visible_kernels: the rewrite calls the ``triton_op`` form of the linear op
            (``kernels/triton/visible.py``), so Inductor schedules its Triton kernels like its own
            on CUDA, with the layouts' index tables as extra graph inputs; ``False`` calls the
            opaque custom op (an external call for Inductor). Same numbers either way; CPU
            tensors take the CPU path in both.
        inductor_config: ``torch._inductor.config`` patches passed to Inductor.
        hardware: the hardware profile of the cost model: ``"auto"`` (detected from the graph's
            device) or a name from ``cost.hardware.BUILTIN_PROFILES`` (a100, h100, h200, l4, cuda,
            cpu); a calibration stored by ``sparse-compiler calibrate`` is loaded.
        tokens: the training tokens planned for this model (``D``); ``None``: 20 per parameter, the
            compute-optimal budget of the Chinchilla law.
        loss_law: ``"chinchilla"`` (default), ``"besiroglu"``, or a dict with E, A, B, alpha, beta.
        sparsity_efficiency: ``γ`` of the dense-equivalent size ``n·d^(1−γ)`` of a sparse layer
            (``cost/scaling.py``); 0.5 makes 75%-sparse weights worth twice their nonzeros.
        critical_margin: the plan keeps the dense-equivalent size above ``N_crit·(1 + margin)``.
        targets: which kinds of node may become sparse: ``"linear"`` and/or ``"attention"``.
            Attention sparsity changes what a model computes more than weight sparsity does, so it
            is off unless asked for.
        attention_pattern: the static block pattern of sparse attention: ``"butterfly"``,
            ``"local"``, ``"global"``, their union with ``"+"`` (default
            ``"butterfly+local+global"``), ``"strided"``, ``"fixed"`` (Sparse Transformer) or
            ``"bigbird"``.
        attention_density: target fraction of kept (query block, key block) pairs.
        attention_block_size: side of a block of the attention score matrix, in tokens.
        attention_window: half-width of the local window, in blocks.
        attention_global: number of leading global blocks (they attend and are attended everywhere).
        attention_seed: seed of BigBird's random blocks (fixed, so the layout stays static).
        attention_min_seq_len: ``None``: the time model decides from which sequence length sparse
            attention pays; an int makes attention sparse from that length on.
        attention_seq_len: ``None``: the pattern is fitted to ``attention_density`` at each length
            the model is called with (so it differs between lengths). An int fixes the pattern: its
            parameters are fitted at this self-attention length, and every length uses them, the
            shorter ones seeing the top-left corner of the longer ones' layout; a causal model then
            computes at each position what it computes there in any longer sequence. Lengths at
            which block-sparse kernels do not pay apply the same pattern through SDPA with its
            element mask (no speed-up), and so do key/value cache steps, whose queries take the
            bottom rows of the layout at the key length.
        attention_causal: ``None``: an attention node gets the causal pattern when it is causal
            itself (``is_causal``, a causal mask buffer, a model mask that allows no later key on
            the example inputs) or is a key/value cache step. ``True`` or ``False`` choose for
            every node, e.g. ``True`` for a decoder whose mask arrives from outside the graph, so
            that padded and unpadded calls, cached or not, share one pattern. The model's own mask
            and causality are applied either way; this only chooses the pattern's blocks and how
            they were fitted.
        attention_kernel: which kernels run block-sparse attention on CUDA. ``"auto"``: the
            project's Triton kernels (long block rows first) where they apply (no model mask but a
            key padding mask, blocks of 16 to 128, head dims up to 128), else FlexAttention;
            ``"flex"``: FlexAttention always.
    """

    enabled: bool = True
    density: float | None = None
    block_size: int | None = None
    butterfly_size: int | None = None
    n_factors: int | None = None
    global_size: int = 0
    shuffle: bool | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    min_features: int = 0
    allow_shared_weights: bool = False
    rescale_init: bool = True
    keep_found_layouts: bool = True
    report: bool | str = False
    eager: bool = False
    visible_kernels: bool = True
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    hardware: str = "auto"
    tokens: float | None = None
    loss_law: str | Mapping[str, float] = "chinchilla"
    sparsity_efficiency: float = 0.5
    critical_margin: float = 0.1
    targets: tuple[str, ...] = ("linear",)
    attention_pattern: str = "butterfly+local+global"
    attention_density: float = 0.25
    attention_block_size: int = 128
    attention_window: int = 1
    attention_global: int = 1
    attention_seed: int = 0
    attention_min_seq_len: int | None = None
    attention_seq_len: int | None = None
    attention_causal: bool | None = None
    attention_kernel: str = "auto"

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"sparsify option {name}={getattr(self, name)!r}: {why}")

        if self.shuffle is not None and not isinstance(self.shuffle, bool):
            fail("shuffle", "expected None (where needed), True or False")
        for name in ("enabled", "allow_shared_weights", "rescale_init", "keep_found_layouts", "eager", "visible_kernels"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "expected True or False")
        if self.attention_causal is not None and not isinstance(self.attention_causal, bool):
            fail("attention_causal", "expected None (from each node), True or False")
        if self.attention_kernel not in ("auto", "flex"):
            fail("attention_kernel", "expected 'auto' (own Triton kernels where they apply) or 'flex'")
        d = self.density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1):
            fail("density", "expected None (cost model) or a number in (0, 1]")
        for name in ("block_size", "min_features", "global_size"):
            value = getattr(self, name)
            if name == "block_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "block_size" else 0):
                fail(name, "expected a positive int" if name == "block_size" else "expected an int >= 0")
        if (self.butterfly_size is None) != (self.n_factors is None):
            fail("butterfly_size" if self.butterfly_size is None else "n_factors", "set butterfly_size and n_factors together")
        if self.butterfly_size is not None:
            bs = self.butterfly_size
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
                fail("butterfly_size", "expected a power of 2, at least 2")
            k = self.n_factors
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= bs.bit_length() - 1:
                fail("n_factors", f"expected an int in [1, log2(butterfly_size)] = [1, {bs.bit_length() - 1}]")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, (tuple, list)) or not all(isinstance(g, str) for g in value):
                fail(name, "expected a glob string or a list of glob strings")
            else:
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.report, (bool, str)):
            fail("report", "expected True, False or an output path (.json, .md, .html, .txt)")
        if isinstance(self.report, str) and not self.report.endswith((".json", ".md", ".html", ".txt")):
            fail("report", "a report path must end in .json, .md, .html or .txt")
        if not isinstance(self.inductor_config, Mapping):
            fail("inductor_config", "expected a dict of torch._inductor.config settings")
        if not isinstance(self.hardware, str):
            fail("hardware", "expected 'auto' or a profile name")
        from sparse_compiler.cost.hardware import BUILTIN_PROFILES

        if self.hardware != "auto" and self.hardware.lower() not in BUILTIN_PROFILES:
            fail("hardware", f"unknown profile; known: auto, {', '.join(BUILTIN_PROFILES)}")
        t = self.tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            fail("tokens", "expected None or a positive number of training tokens")
        from sparse_compiler.cost.scaling import LOSS_LAWS

        law = self.loss_law
        if isinstance(law, str):
            if law not in LOSS_LAWS:
                fail("loss_law", f"expected one of {', '.join(LOSS_LAWS)} or a dict with E, A, B, alpha, beta")
        elif not isinstance(law, Mapping) or set(law) != {"E", "A", "B", "alpha", "beta"}:
            fail("loss_law", "a custom law is a dict with exactly the keys E, A, B, alpha, beta")
        for name, low, high in (("sparsity_efficiency", 0.0, 1.0), ("critical_margin", 0.0, 10.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                fail(name, f"expected a number in [{low}, {high})")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (tuple, list)) or not targets or not set(targets) <= {"linear", "attention"}:
            fail("targets", "expected a non-empty subset of ('linear', 'attention')")
        object.__setattr__(self, "targets", tuple(targets))
        parts = self.attention_pattern.split("+") if isinstance(self.attention_pattern, str) else [None]
        combinable, alone = {"butterfly", "local", "global"}, {"strided", "fixed", "bigbird"}
        if not (set(parts) <= combinable or (len(parts) == 1 and parts[0] in alone)):
            fail(
                "attention_pattern",
                "expected butterfly, local, global or a '+' union of them, or one of strided, fixed, bigbird",
            )
        d = self.attention_density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            fail("attention_density", "expected a number in (0, 1]")
        for name in ("attention_min_seq_len", "attention_seq_len"):
            m = getattr(self, name)
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
                fail(name, "expected None or a positive int")
        for name in ("attention_block_size", "attention_window", "attention_global", "attention_seed"):
            value = getattr(self, name)
            low = 1 if name == "attention_block_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"expected an int >= {low}")

    @classmethod
    def accepted(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None, **overrides: Any) -> Options:
        """Build from a dict (``torch.compile(options=...)``), rejecting unknown keys by name."""
        if isinstance(mapping, Options):
            merged = dataclasses.asdict(mapping)
        elif mapping is None:
            merged = {}
        elif isinstance(mapping, Mapping):
            merged = dict(mapping)
        else:
            raise TypeError(f"sparsify options must be a dict, got {type(mapping).__name__}")
        merged.update(overrides)
        accepted = cls.accepted()
        unknown = [k for k in merged if k not in accepted]
        if unknown:
            hints = {k: difflib.get_close_matches(str(k), accepted, n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown sparsify option {said}; accepted options: {', '.join(accepted)}")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inductor_config"] = dict(self.inductor_config)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["targets"] = list(self.targets)
        d["loss_law"] = self.loss_law if isinstance(self.loss_law, str) else dict(self.loss_law)
        return d
