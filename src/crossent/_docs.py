"""Docstring text, written once and shared by the functions and the modules."""

from __future__ import annotations

BACKEND = r"""backend (str, keyword-only): ``"auto"`` picks per call from the input's device;
            ``"torch"`` (portable plain-torch primitives) and ``"reference"`` (the NumPy
            float64 oracle, for checking) may be forced. An unknown or unavailable backend
            raises; there is no silent fallback. Default: ``"auto"``"""

WEIGHT = r"""weight (Tensor, optional): a manual rescaling weight given to each class, of
            size `C` and, for class-index targets, of the input's dtype. Default: ``None``"""

LEGACY = r"""size_average (bool, optional): deprecated (see :attr:`reduction`). Default: ``None``
        reduce (bool, optional): deprecated (see :attr:`reduction`). When either of
            :attr:`size_average` and :attr:`reduce` is not ``None`` it overrides
            :attr:`reduction`, with torch's deprecation warning. Default: ``None``"""

IGNORE_INDEX = r"""ignore_index (int, optional): a target value that is ignored and does not
            contribute to the loss or to the input gradient; any integer, negative ones
            included. With ``'mean'`` the loss is averaged over non-ignored targets only.
            Default: ``-100``"""

REDUCTION = r"""reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. ``'mean'`` divides
            the summed loss by the summed weight of the non-ignored targets (by the number of
            rows for probability targets). Default: ``'mean'``"""

EXTENSIONS = r"""z_loss (float, keyword-only): coefficient λ of the z-loss (PaLM): every
            non-ignored row's loss gains ``λ·lse²``, ``lse`` being the log-sum-exp of its
            logits; reduced like the loss itself. Default: ``0.0``
        softcap (float, keyword-only): soft-capping (Gemma 2): the logits are read as
            ``softcap·tanh(x / softcap)``. Default: ``None`` (no capping)
        temperature (float, keyword-only): the logits (after capping) are divided by it.
            Default: ``1.0``. The ``cpu`` backend's fused kernels include all three
            (soft-capping with a vectorised tanh, evaluated again for the gradient's
            ``1 - tanh²``)."""

PRECISION_NOTE = r""".. note::
        float16 and bfloat16 inputs are read as they are and computed in float32; float64
        is computed in float64. Results are deterministic: the same inputs give the same bits
        on every call. Second derivatives are not supported: a backward pass that would build
        their graph (``create_graph=True``) raises rather than return a wrong value."""

_SOFTMAX_TEMPLATE = r"""Apply a {kind} function along :attr:`dim`, exactly as
    :func:`torch.nn.functional.{name}`.

    {formula}

    Args:
        input (Tensor): input of any floating dtype (or any dtype with :attr:`dtype`).
        dim (int): the dimension along which {name} is computed. ``None`` is deprecated: it
            warns and picks dim 0 for 0-, 1- and 3-D input and dim 1 otherwise, as torch does.
            Default: ``None``
        _stacklevel (int): stack level of the implicit-dim warning. Default: ``3``
        dtype (:class:`torch.dtype`, optional): if given, the input is cast to it before the
            operation (pass it by keyword). Default: ``None``
        {backend}

    Shape:
        - Input: :math:`(*)`, any number of dimensions
        - Output: :math:`(*)`, same shape as the input, contiguous

    Examples::

        >>> import torch, crossent
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> crossent.{name}(x, dim=1)
        {example}

    {note}
    """

SOFTMAX = _SOFTMAX_TEMPLATE.format(
    kind="softmax",
    name="softmax",
    formula=r":math:`\text{softmax}(x)_i = \exp(x_i - m) / \sum_j \exp(x_j - m)`, "
    r"with :math:`m = \max_j x_j`.",
    backend=BACKEND,
    example="tensor([[0.0900, 0.2447, 0.6652]])",
    note=PRECISION_NOTE,
)

LOG_SOFTMAX = _SOFTMAX_TEMPLATE.format(
    kind="log-softmax",
    name="log_softmax",
    formula=r":math:`\text{log\_softmax}(x)_i = x_i - m - \log \sum_j \exp(x_j - m)`, "
    r"with :math:`m = \max_j x_j`.",
    backend=BACKEND,
    example="tensor([[-2.4076, -1.4076, -0.4076]])",
    note=PRECISION_NOTE,
)

_SHAPE = r"""Shape:
        - Input: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`, `K >= 1`
        - Target (class indices): :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`,
          int64 (uint8 also for 1-D and 2-D input), each value in :math:`[0, C)` or equal
          to :attr:`ignore_index`"""

NLL_LOSS = rf"""Compute the negative log likelihood loss, exactly as
    :func:`torch.nn.functional.nll_loss`.

    :math:`\ell_n = -w_{{y_n}} x_{{n, y_n}}`, or 0 where :math:`y_n` = :attr:`ignore_index`.

    Args:
        input (Tensor): log-probabilities (any values are used as they are).
        target (Tensor): class indices.
        {WEIGHT}
        {LEGACY}
        {IGNORE_INDEX}
        {REDUCTION}
        {BACKEND}

    {_SHAPE}
        - Output: scalar, or the target's shape with ``reduction='none'``

    Examples::

        >>> import torch, crossent
        >>> logp = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
        >>> crossent.nll_loss(logp, torch.tensor([1, 0]))
        tensor(0.4904)

    {PRECISION_NOTE}
    """

CROSS_ENTROPY = rf"""Compute the cross entropy between input logits and target, exactly as
    :func:`torch.nn.functional.cross_entropy`, in one fused pass.

    The forward pass computes each row's loss and the gradient of the logits together (one
    exponential per element) and keeps no log-probabilities; backward only scales that
    gradient by the incoming one.

    Args:
        input (Tensor): unnormalised logits.
        target (Tensor): class indices, or class probabilities of the input's shape (any
            floating dtype; the loss then has the promoted dtype and the target, and the
            weight, are differentiable, as in torch).
        {WEIGHT}
        {LEGACY}
        {IGNORE_INDEX} Not supported (``>= 0`` raises) with probability targets.
        {REDUCTION}
        label_smoothing (float, optional): :math:`\varepsilon` in :math:`[0, 1]`; the target
            becomes :math:`(1-\varepsilon)\,\text{{onehot}}(y) + \varepsilon / C`. Values
            :math:`\le 0` mean no smoothing. Default: :math:`0.0`
        {BACKEND}
        inplace_backward (bool, keyword-only): write the gradient over the input logits
            instead of a new buffer, saving one logits-sized tensor. The logits then hold
            the gradient and must not be used afterwards; autograd is told (the input is
            marked dirty), so it raises if something else saved them for backward. Views
            work (the base is rewritten through autograd). Checked before anything is
            written, with torch's errors for in-place operations: not on a leaf that
            requires grad or a view of one, an expanded tensor, logits whose memory holds
            the target or the weight, nor when a probability target or the weight requires
            grad. Without a gradient to compute, nothing is written. Default: ``False``
        {EXTENSIONS}

    {_SHAPE}
        - Target (probabilities): same shape as the input
        - Output: scalar, or the input's shape without the class dim with ``reduction='none'``

    Examples::

        >>> import torch, crossent
        >>> x = torch.tensor([[1.0, 2.0, 0.5], [0.2, 1.5, 2.5]])
        >>> crossent.cross_entropy(x, torch.tensor([1, 2]))
        tensor(0.3982)

    {PRECISION_NOTE}
    """

MODULE_BACKEND_NOTE = r"""The module takes the same constructor arguments as its torch
    counterpart (it subclasses it, so ``isinstance`` checks, ``state_dict`` and ``repr`` are
    torch's) plus a keyword-only ``backend``; see :func:`crossent.{fn}` for the computation.

    Args:
        backend (str, keyword-only): see :func:`crossent.{fn}`. Default: ``"auto"``
    """

LINEAR_CROSS_ENTROPY = rf"""Compute the cross entropy of ``input @ linear_weight.T + linear_bias``
    and ``target`` exactly as :func:`torch.nn.functional.linear_cross_entropy`, without
    materialising the logits.

    Rows are processed in chunks whose logits fit :attr:`chunk_bytes`: a matmul writes a
    chunk's logits into one reused buffer, the fused cross-entropy pass turns them into the
    gradient of the logits in place, and two more matmuls add that chunk's share of the
    input and weight gradients. Peak memory above the inputs is the two gradients and, on
    CPU tensors, at most 64 MiB more by default: the chunk is sized from what is left of
    that allowance after the weight gradient's running sum (a byte per element for bfloat16
    weights on the CPU backend, whose sums keep 24 bits; a float32 array for other
    float16/bfloat16 weights, which can exceed it) and float32 slices of 16-bit products.
    Rows whose target is :attr:`ignore_index` are dropped before the projection. Gradients
    are exact and deterministic. With ``reduction='none'`` the backward pass recomputes each chunk's
    logits, because the per-row incoming gradient is needed to form the weight gradient.

    Args:
        input (Tensor): ``(N, in_features)`` or unbatched ``(in_features,)``; also (which
            torch refuses) ``(B, T, ..., in_features)`` hidden states with ``(B, T, ...)``
            class indices or ``(B, T, ..., C)`` probabilities, ``reduction='none'`` then
            giving ``(B, T, ...)`` losses.
        linear_weight (Tensor): ``(C, in_features)``, or ``(C, d_1, ..., d_K, in_features)``
            for a K-dimensional loss (that case, and targets or class weights that require
            grad, are computed through materialised logits, as torch's reference path).
        target (Tensor): class indices ``(N,)``, or class probabilities of the logits' shape.
        linear_bias (Tensor, optional, keyword-only): ``(C,)`` (or ``(C, d_1, ..., d_K)``)
            added to the projection. Default: ``None``
        {WEIGHT}
        {REDUCTION}
        ignore_index (int, optional): a class-index target value that is ignored; ``None``
            means ``-100``. Must stay ``None`` for probability targets. Default: ``None``
        label_smoothing (float, optional): :math:`\varepsilon` in :math:`[0, 1]`, as in
            :func:`crossent.cross_entropy`. Default: :math:`0.0`
        options (LinearCrossEntropyOptions, optional): accepted for torch compatibility;
            crossent always chunks, and uses its ``batch_chunk_size`` as the most rows
            per chunk when set. Default: ``None``
        {BACKEND}
        chunk_bytes (int, keyword-only): memory budget for one chunk's logits, which sets
            the most rows per chunk (the rows are then spread evenly over the chunks). Default:
            ``None`` (on CPU tensors what the 64 MiB allowance leaves, at least 16 MiB;
            elsewhere 60 MiB)
        {EXTENSIONS}
        logits_dtype (torch.dtype, keyword-only): the cross entropy reads the logits (computed
            in the input's dtype) as this dtype, and the loss has it: ``torch.float32`` is
            transformers' ``logits.float()`` before its loss, so a bfloat16 model's loss is
            not rounded to bfloat16. Default: ``None`` (the input's dtype)
        divisor (float or Tensor, keyword-only): with ``reduction='sum'``, the loss is the
            sum divided by this number or one-element tensor (transformers'
            ``num_items_in_batch`` under gradient accumulation); the division is folded into
            the gradient the forward pass writes, so it costs no memory. Default: ``None``

    Shape:
        - Output: scalar, or ``(N,)`` (``()`` unbatched) with ``reduction='none'``

    {PRECISION_NOTE}
    """

LINEAR_MODULE_NOTE = r"""The module takes the same constructor arguments as its torch
    counterpart (it subclasses it, so ``isinstance`` checks, ``state_dict`` and ``repr`` are
    torch's) plus keyword-only ``backend`` and ``chunk_bytes``; see
    :func:`crossent.linear_cross_entropy` for the computation.

    Args:
        backend (str, keyword-only): see :func:`crossent.linear_cross_entropy`.
            Default: ``"auto"``
        chunk_bytes (int, keyword-only): see :func:`crossent.linear_cross_entropy`.
            Default: ``None``
    """

_TRANSFORM_ARGS = r"""softcap (float, keyword-only): read the logits as
            ``softcap·tanh(x / softcap)``. Default: ``None``
        temperature (float, keyword-only): divide the (capped) logits by it. Default: ``1.0``"""

TOKEN_STATS = rf"""Per-token log-probability of ``target``, entropy, log-sum-exp and argmax of a
    softmax over the last dim of ``logits``, without a log-probability tensor: what
    policy-gradient fine-tuning needs (log π(a|s) and an entropy bonus).

    With u the logits as read and p = softmax(u): ``logprob = u_y - lse``,
    ``entropy = lse - Σ_j p_j·u_j``; their gradients ``[j = y] - p_j`` and
    ``-p_j·(u_j - Σ_k p_k·u_k)`` with respect to u are formed in backward from the saved
    logits (the fused CPU kernels in one pass over each row).

    Args:
        logits (Tensor): ``(..., V)`` floating-point logits.
        target (Tensor): ``(...)`` int64 class indices (the logits' shape without the class dim).
        ignore_index (int, keyword-only): targets equal to it get ``logprob`` 0 (no
            gradient); the other statistics are computed for every token. Default: ``-100``
        {_TRANSFORM_ARGS}
        chunk_bytes (int, keyword-only): where a backend holds ``(rows, V)`` float32
            temporaries (the portable one), rows go in chunks whose copy fits this budget.
            Default: ``None`` (4 MiB on CPU, 64 MiB on other devices)
        {BACKEND}

    Returns:
        :class:`crossent.TokenStats` ``(logprob, entropy, lse, argmax)``; the first three in
        the logits' dtype, ``argmax`` int64; ``logprob`` and ``entropy`` differentiable.
    """

LINEAR_TOKEN_STATS = rf""":func:`crossent.token_stats` of the logits
    ``input @ linear_weight.T + linear_bias``, computed a chunk of rows at a time: the
    ``(..., V)`` logits never exist. Backward forms each chunk's logits again and turns them
    into their gradient in place before the two matmuls of its share of the gradients.

    Args:
        input (Tensor): ``(..., D)`` hidden states.
        linear_weight (Tensor): ``(V, D)`` classifier weight, of the input's dtype.
        target (Tensor): ``(...)`` int64 class indices.
        linear_bias (Tensor, keyword-only): ``(V,)`` bias. Default: ``None``
        ignore_index (int, keyword-only): as in :func:`crossent.token_stats`. Default: ``-100``
        {_TRANSFORM_ARGS}
        chunk_bytes (int, keyword-only): memory budget of one chunk's logits.
            Default: ``None`` (60 MiB)
        {BACKEND}

    Returns:
        :class:`crossent.TokenStats`; ``logprob`` and ``entropy`` differentiable in ``input``,
        ``linear_weight`` and ``linear_bias``.
    """
