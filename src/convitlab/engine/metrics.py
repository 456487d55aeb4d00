"""Classification metrics, accumulated as tensors so the loop does not sync every step."""
import paddle
import paddle.nn.functional as F

from convitlab.core import distributed


def soft_target_cross_entropy(logits, targets):
    return -(targets * F.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


def correct_top_k(logits, labels, k: int):
    """Number of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[-1])
    top = paddle.topk(logits, k, axis=-1)[1]
    return (top == labels.unsqueeze(-1)).any(axis=-1).astype("float32").sum()


class Totals:
    """Sums of named tensors or numbers over an epoch; `mean` divides by the sample count."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, count: int, **values):
        self.count += count
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def reduced(self):
        """Host values, summed over ranks when training is distributed."""
        names = sorted(self.sums)
        values = [float(self.sums[n]) for n in names] + [float(self.count)]
        values = distributed.sum_across_ranks(values)
        return dict(zip(names, values[:-1])), values[-1]
