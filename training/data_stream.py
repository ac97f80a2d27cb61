"""An endless, resumable stream of training batches over epochs of a finite dataloader."""

from collections.abc import Callable, Iterable, Iterator


class DataStream:
    """Yields batches from `make_loader(epoch)` epoch after epoch, counting its position.

    The position `{"epoch", "batch"}` is part of the resumable state: `load_state_dict` makes the next
    batch the one an uninterrupted run would have drawn (the epoch's loader is rebuilt with the same
    epoch-derived seed and the consumed batches are skipped).
    """

    def __init__(self, make_loader: Callable[[int], Iterable[dict]]):
        self.make_loader = make_loader
        self.epoch, self.batch = 0, 0
        self._iter: Iterator[dict] | None = None

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> dict:
        for _ in range(2):  # a fresh epoch must yield at least one batch
            if self._iter is None:
                self._iter = iter(self.make_loader(self.epoch))
                for skipped in range(self.batch):
                    if next(self._iter, None) is None:
                        raise RuntimeError(
                            f"the data position to resume at (epoch {self.epoch}, batch {self.batch}) is past "
                            f"the end of that epoch, which has {skipped} batches: the training split, its "
                            "cache or train.batch_size changed since the checkpoint"
                        )
            try:
                item = next(self._iter)
                self.batch += 1
                return item
            except StopIteration:
                self._iter, self.epoch, self.batch = None, self.epoch + 1, 0
        raise RuntimeError(f"the training split yielded no batch in epoch {self.epoch - 1}: is it empty?")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self._iter = state["epoch"], state["batch"], None
