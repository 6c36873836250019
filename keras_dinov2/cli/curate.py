"""`keras-dinov2 curate embed | select`: a pool embedded into shards, then curated into a manifest and a report."""

import os

from keras_dinov2.cli.commands import check_preset_spec


def pool_spec(data):
    """--data as `get_source` takes it: a .txt file becomes the list of image files it names (one per line)."""
    if data.endswith(".txt") and os.path.isfile(data):
        with open(data) as f:
            paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not paths:
            raise ValueError(f"--data {data!r} lists no image files (one path per line expected).")
        base = os.path.dirname(os.path.abspath(data))
        return [path if os.path.isabs(path) else os.path.join(base, path) for path in paths]
    return data


def distribution_for(mode):
    """The data-parallel setup `--distribution` asks for (JAX only), or None for one device."""
    import keras

    if mode == "none":
        return None
    if keras.backend.backend() != "jax":
        if mode == "data":
            raise ValueError(f"--distribution data splits batches over devices on jax only (the backend is "
                             f"{keras.backend.backend()}); run one process per device with --num-workers and "
                             "--worker-index instead.")
        return None
    from keras_dinov2 import distribute

    dist = distribute.setup(mode)
    return dist if dist.mode == "data" else None


def run_embed(args):
    """`keras-dinov2 curate embed`."""
    from keras_dinov2 import curation

    if args.worker_index >= args.num_workers:
        raise ValueError(f"--worker-index must be below --num-workers ({args.num_workers}), received "
                         f"{args.worker_index}.")
    check_preset_spec("--model", args.model)
    dist = distribution_for(args.distribution)
    backbone = curation.open_backbone(args.model, random_weights=args.random_weights)
    if dist is not None:
        print(f"Embedding on {dist.describe()}.")
    pool = curation.embed_pool(
        pool_spec(args.data), backbone, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=args.dtype, image_size=args.image_size, backbone_name=args.model, distribution=dist,
        num_workers=args.num_workers, worker_index=args.worker_index, max_image_pixels=args.max_image_pixels,
        verbose=bool(args.verbose),
    )
    if pool is None:
        print(f"Wrote this worker's shards into {args.out}; the folder is complete once every worker is done.")
        return 0
    print(f"Wrote {args.out}: {len(pool.positions)} embeddings of dimension {pool.dim} ({pool.meta['dtype']}, "
          f"{pool.meta['num_shards']} shard(s)); {len(pool.unreadable)} unreadable image(s) of {pool.num_images} "
          "(listed in files.csv).")
    return 0


def embeddings_of(spec, name, pool, args):
    """An embedding folder as is, or data embedded with the pool's backbone into OUT/<name>_embeddings."""
    from keras_dinov2 import curation

    if os.path.isfile(os.path.join(spec, "embeddings.json")):
        return curation.load_embeddings(spec)
    model = args.model or pool.identity["name"]
    check_preset_spec("--model" if args.model else f"the pool's recorded backbone for --{name}", model)
    backbone = curation.open_backbone(model, random_weights=args.random_weights)
    return curation.embed_pool(
        pool_spec(spec), backbone, os.path.join(args.out, f"{name}_embeddings"), batch_size=args.batch_size,
        dtype=pool.meta["dtype"], image_size=pool.identity["image_size"], resize_size=pool.identity["resize_size"],
        backbone_name=model, verbose=bool(args.verbose),
    )


def run_select(args):
    """`keras-dinov2 curate select`."""
    from keras_dinov2 import curation

    if (args.per_cluster or args.total) and not args.levels:
        raise ValueError("--per-cluster and --total sample over k-means clusters: give --levels too.")
    pool = curation.load_embeddings(args.embeddings)
    eval_ = embeddings_of(args.eval_data, "eval", pool, args) if args.eval_data else None
    seeds = embeddings_of(args.seeds, "seed", pool, args) if args.seeds else None
    settings = {key: getattr(args, key) for key in ("dedup_threshold", "eval_data", "decontamination_threshold",
                                                     "seeds", "k", "retrieval_clusters", "min_seeds", "levels",
                                                     "per_cluster", "total", "index", "seed")}
    selection = curation.select_pool(
        pool, dedup_threshold=args.dedup_threshold, eval_embeddings=eval_,
        decontamination_threshold=args.decontamination_threshold, seeds=seeds, k=args.k,
        retrieval_clusters=args.retrieval_clusters, min_seeds=args.min_seeds, levels=args.levels,
        per_cluster=args.per_cluster, total=args.total, index=args.index, seed=args.seed, verbose=bool(args.verbose),
    )
    report = curation.write_selection(selection, pool, args.out, settings=settings, seed=args.seed)
    steps = ", ".join(f"{step} {count}" for step, count in selection.counts.items())
    print(f"Kept {report['kept']} of {pool.num_images} images ({steps}).")
    print(f"Wrote {', '.join(os.path.join(args.out, name) for name in report['files'])}.")
    print(f"Pretrain on them with: keras-dinov2 pretrain --data {args.out}")
    return 0


def run_curate(args):
    """`keras-dinov2 curate`: its step's body."""
    return {"embed": run_embed, "select": run_select}[args.curate_command](args)
