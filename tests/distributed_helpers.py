"""Helpers of the distributed tests: a global batch split into per-replica batches, and simulated replicas.

`split_batch` is the inverse of `keras_dinov2.distribute.stack_batches`: the tests feed its parts to N replicas
(or stack them for one JAX program) and compare the step with one device's on the whole batch. `FakeCluster`
runs one function per simulated replica in threads, with NumPy collectives behind a `CrossReplica`.
"""

import threading

import numpy as np
from keras import ops

from keras_dinov2 import losses


def split_batch(batch, num_replicas, buffer_size=None):
    """Splits one global multi-crop batch (NumPy) into `num_replicas` per-replica batches.

    Replica r gets images r*b .. (r+1)*b - 1 (b = B / num_replicas) of every crop, and the masked patches of
    those images in its own buffer (indices renumbered into its own crops, weights unchanged), padded to
    `buffer_size` entries (default: the global buffer's length, which always fits). Stacking the result
    (`stack_batches`) or feeding one part to each replica reproduces the single-device step on `batch`, so
    this is how the tests compare N replicas with one device.

    Args:
        batch: dict of NumPy arrays as `multicrop_dataset` yields (view-major crops).
        num_replicas: int. Must divide the batch's images.
        buffer_size: optional int. Length of each replica's masked-patch buffer.

    Returns:
        list of `num_replicas` dicts.
    """
    batch = {k: np.asarray(v) for k, v in batch.items()}
    n = int(num_replicas)
    two_b = batch["global_crops"].shape[0]
    images = two_b // 2
    if n < 1 or images % n:
        raise ValueError(
            f"`num_replicas` must divide the batch's {images} images, received num_replicas={num_replicas}."
        )
    b = images // n
    num_patches = batch["masks"].shape[1]
    local = batch.get("local_crops")
    n_local = 0 if local is None else local.shape[0] // images
    weights = batch["masks_weight"]
    indices = batch["mask_indices"]
    buffer_size = int(buffer_size or indices.shape[0])
    real = np.flatnonzero(weights > 0)
    image = indices[real] // num_patches
    view, k = image // images, image % images
    owner = k // b
    local_index = ((view * b + k % b) * num_patches + indices[real] % num_patches).astype(indices.dtype)

    def rows(x, views, r):
        return np.concatenate([x[v * images + r * b: v * images + (r + 1) * b] for v in range(views)])

    parts = []
    for r in range(n):
        mine = owner == r
        count = int(mine.sum())
        if count > buffer_size:
            raise ValueError(
                f"Replica {r} has {count} masked patches, more than buffer_size={buffer_size}."
            )
        part_indices = np.zeros(buffer_size, indices.dtype)
        part_weights = np.zeros(buffer_size, weights.dtype)
        part_indices[:count] = local_index[mine]
        part_weights[:count] = weights[real][mine]
        part = {
            "global_crops": rows(batch["global_crops"], 2, r),
            "masks": rows(batch["masks"], 2, r),
            "mask_indices": part_indices,
            "masks_weight": part_weights,
            "n_masked_patches": np.asarray(count, "int32"),
        }
        if local is not None:
            part["local_crops"] = rows(local, n_local, r)
        parts.append({k: part[k] for k in batch if k in part})
    return parts


class FakeCluster:
    """Runs one function per simulated replica in threads; the collectives meet at a barrier.

    Example:
    >>> FakeCluster(2).run(lambda reduction, x: reduction.sum(x), [(a,), (b,)])   # [a + b, a + b]
    """

    def __init__(self, num_replicas):
        self.num_replicas = num_replicas
        self.barrier = threading.Barrier(num_replicas, timeout=60)
        self.slots = [None] * num_replicas

    def _collective(self, rank, x, combine):
        self.slots[rank] = np.asarray(ops.convert_to_numpy(x))
        self.barrier.wait()
        out = combine(np.stack(self.slots)).astype(self.slots[rank].dtype)
        self.barrier.wait()
        return ops.convert_to_tensor(out)

    def reduction(self, rank):
        """The `CrossReplica` of replica `rank`."""
        return losses.CrossReplica(
            sum_fn=lambda x: self._collective(rank, x, lambda a: a.sum(0)),
            max_fn=lambda x: self._collective(rank, x, lambda a: a.max(0)),
            all_gather_fn=lambda x: self._collective(rank, x, lambda a: np.concatenate(list(a), 0)),
            num_replicas=self.num_replicas,
        )

    def run(self, fn, shards):
        """`fn(reduction, *shards[rank])` on every replica at once; the results (float64 NumPy), by rank."""
        results, errors = [None] * self.num_replicas, []

        def target(rank):
            try:
                out = fn(self.reduction(rank), *shards[rank])
                results[rank] = np.asarray(ops.convert_to_numpy(out), dtype=np.float64)
            except Exception as e:  # re-raised in the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.num_replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
