"""Reporting: the machine header, aligned result tables, JSON output."""

import json


def fmt(value, pattern, missing="-"):
    """`pattern.format(value)`, or `missing` for None."""
    return missing if value is None else pattern.format(value)


def print_header(width, title, info, extra=(), own_load_included=False):
    """A report's opening: a rule, the title, the machine, `extra` lines, load and environment.

    The load average before and after the run comes from `info["load_before"]` and
    `info["load_after"]`; above half the core count, CPU timings are flagged as unreliable
    (by the load before the run alone when the run's own load is included in the one after).
    """
    print("\n" + "=" * width)
    print(title)
    usable = f", {info['cpus_usable']} usable" if info["cpus_usable"] else ""
    print(
        f"CPU: {info['cpu']} ({info['cpu_count']} logical cores{usable}), "
        f"{fmt(info['memory_gb'], '{} GB')} RAM"
    )
    if info["gpus"]:
        print("GPU: " + "; ".join(info["gpus"]))
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    print("Python " + info["python"] + ", " + versions)
    for line in extra:
        print(line)
    before, after = info.get("load_before"), info.get("load_after")
    if before is not None and after is not None:
        busy = before if own_load_included else max(before, after)
        print(
            f"Load average (1 min) before: {before:.2f}, after: {after:.2f}"
            + (" (this run's own load included)" if own_load_included else "")
            + f" on {info['cpu_count']} cores"
            + (
                "  <-- busy machine: CPU timings are not reliable"
                if busy > 0.5 * info["cpu_count"]
                else ""
            )
        )
    if info["env"]:
        print("Environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))


def print_table(header, rows, width):
    """The rows under the header, every column padded to its widest cell, between two rules."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print("-" * width)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print("-" * width)


def print_footer(skipped, width):
    """The runs that were skipped, and the closing rule."""
    for message in skipped:
        print(f"  skipped: {message}")
    print("=" * width)


def write_json(path, args, info, results, skipped):
    """Writes the settings (the parsed flags), machine, result rows and skips to `path`."""
    with open(path, "w") as f:
        settings = {k: v for k, v in vars(args).items() if k != "worker"}
        json.dump(
            {"settings": settings, "machine": info, "results": results, "skipped": skipped},
            f,
            indent=2,
        )
    print(f"Wrote {path}")
