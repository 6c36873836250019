"""Export a run's teacher backbone (or a preset) and publish it on the Hugging Face Hub.

One repository per format: keras-hub and transformers folders both need their own
config.json at the root. Each format is exported into `--out/<format>`, verified against the
source (the run stops on a mismatch), given a model card, and uploaded. The token comes from
HF_TOKEN or the file `hf auth login` writes; without one, or on a network error, the local
exports stay where they are and the command says how to retry.

Usage:
    python tools/export_to_hub.py --run runs/latest --repo hf://me/dinov2-digits
    python tools/export_to_hub.py --run runs/latest --repo hf://me/dinov2-digits \\
        --formats keras_hub transformers --private --revision v1
    (with several formats, each goes to hf://me/dinov2-digits-<format>)
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (its newest checkpoint's teacher)")
    source.add_argument("--preset", help="preset folder, hf:// URI or architecture name")
    parser.add_argument("--repo", required=True, help="hf://user/name")
    parser.add_argument("--formats", nargs="+", default=["keras_hub"],
                        choices=["keras_dinov2", "keras_hub", "transformers"],
                        help="formats to publish (default keras_hub)")
    parser.add_argument("--out", default="exports", help="local folder for the exports")
    parser.add_argument("--heads", action="store_true",
                        help="keras_dinov2 format: include the teacher's heads")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch (default main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import warnings

    from keras_dinov2.export import (
        ExportVerificationError,
        ExportWarning,
        UploadError,
        export,
        load_run,
        load_source,
        parse_repo,
    )

    try:
        repo = parse_repo(args.repo)
        source = load_run(args.run) if args.run else load_source(args.preset)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    status = 0
    for fmt in args.formats:
        target = repo if len(args.formats) == 1 else f"{repo}-{fmt.replace('_', '-')}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExportWarning)  # export prints them itself
                export(source, os.path.join(args.out, fmt), format=fmt,
                       heads=args.heads and fmt == "keras_dinov2", license=args.license,
                       push=f"hf://{target}", private=args.private, revision=args.revision,
                       commit_message=args.commit_message, overwrite=args.overwrite)
        except UploadError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 3
        except (ValueError, ExportVerificationError) as error:
            raise SystemExit(f"error: {error}") from None
    return status


if __name__ == "__main__":
    sys.exit(main())
