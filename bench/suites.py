"""Parameter-shape suites of real models, built from their architecture definitions (nothing is
downloaded and no model is instantiated): what matters to an optimizer's extra work is the list
of parameter tensors — how many and how large."""
from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]


def resnet50() -> List[Shape]:
    """torchvision's resnet50 (Bottleneck, layers [3, 4, 6, 3]): 161 tensors, 25,557,032."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + BatchNorm weight/bias
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:  # projection shortcut
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(1000, 2048), (1000,)]


def vit_b16() -> List[Shape]:
    """ViT-B/16 at 224² (timm/torchvision layout, fused qkv): 152 tensors, 86,567,656."""
    d, mlp, layers = 768, 3072, 12
    shapes: List[Shape] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def lm_stack(layers: int = 16, d: int = 256, vocab: int = 32000) -> List[Shape]:
    """A decoder-only transformer LM (separate q/k/v/o, biases, pre-LN, tied head): many small
    tensors (LayerNorm, biases) and a few large ones (token embedding)."""
    shapes: List[Shape] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]
        for _ in range(4):  # q, k, v, o
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def many_small(count: int = 2000, numel: int = 4096) -> List[Shape]:
    """`count` tensors of `numel` elements: where per-tensor launch overhead dominates."""
    return [(numel,)] * count


def sweep(total: int, count: int = 128) -> List[Shape]:
    """`count` equal tensors adding up to about `total` elements (size-scaling sweep)."""
    return [(max(1, total // count),)] * count


SUITES: Dict[str, Callable[[], List[Shape]]] = {
    "resnet50": resnet50,
    "small2000": many_small,
    "vit_b16": vit_b16,
    "lm_stack": lm_stack,
    **{f"sweep{exp}": (lambda exp=exp: sweep(10 ** exp)) for exp in (4, 5, 6, 7)},
    # tiny shapes for --quick (smoke runs, the harness test)
    "tiny": lambda: [(7, 3, 3, 3), (7,), (13, 7), (13,), (1,), (1000,)],
}
DEFAULT_SUITES = ("resnet50", "small2000", "sweep4", "sweep5", "sweep6")
ALL_SUITES = ("resnet50", "small2000", "vit_b16", "lm_stack", "sweep4", "sweep5", "sweep6",
              "sweep7")


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def total_params(shapes: List[Shape]) -> int:
    return sum(numel(s) for s in shapes)
