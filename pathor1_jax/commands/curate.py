"""`pathor1 curate <step> --in … --out …`: the paper's data-curation stage, one step at a time.

    pathor1 curate extract  --in pdfs/       --out cur/extract  [--workers 8] [--runner beam -- FLAGS]
    pathor1 curate filter   --in cur/extract --out cur/filter
    pathor1 curate classify --in cur/filter  --out cur/classify [--clip DIR] [--labels review.csv]
    pathor1 curate cluster  --in cur/classify --out cur/cluster
    pathor1 curate generate --in cur/cluster --out cur/generate --llm-url URL --llm-model NAME
    pathor1 curate qc       --in cur/generate --out cur/qc
    pathor1 curate sample   --in cur/qc      --out cur/rl [--n 10000]
    pathor1 curate demo     --out runs/demo/curation [--llm-url URL --llm-model NAME]

Every step is idempotent (a rerun skips finished work) and ends with a summary table; bad input is
logged with its file/page/id in `<out>/<step>_report.json`. The LLM key is read from the
environment variable named by `--llm-key-env` (default OPENAI_API_KEY), never from a flag.
"""

from __future__ import annotations

import argparse

from pathor1_jax.errors import UserError
from pathor1_jax.flags import positive_int

STEPS = ("extract", "filter", "classify", "cluster", "generate", "qc", "sample")
DEMO_HELP = "the generated demo book through the steps, pairs found vs the generator's truth"


def _llm_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--llm-url", required=required, help="OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    p.add_argument("--llm-model", required=required, help="the served model's name")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default 8)")


def _runner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runner",
        choices=("local", "beam"),
        default="local",
        help="local process pool (default) or an Apache Beam pipeline",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="local runner: processes (default 1)")
    p.add_argument("beam_args", nargs="*", help="after --: Beam pipeline flags, e.g. --runner=DirectRunner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    helps = {
        "extract": "PDFs -> figure/panel crops, captions, in-line references (pairs.jsonl)",
        "filter": "quality rules and exact / near-duplicate removal",
        "classify": "subfields: CLIP-embedding head trained on caption keywords (+ your corrections)",
        "cluster": "difficulty: k-means (k=3) per subfield -> easy / medium / hard",
        "generate": "CoT SFT samples from an OpenAI-compatible LLM (60 templates)",
        "qc": "rule-based QC of generated samples, report and review sample",
        "sample": "the RL MCQ set, stratified, disjoint from the SFT split",
    }
    for step in STEPS:
        p = sub.add_parser(step, help=helps[step], description=helps[step])
        p.add_argument("--in", dest="inp", required=True, help="input file or the previous step's output dir")
        p.add_argument("--out", required=True, help="output directory")
        if step in ("extract", "filter", "qc"):
            _runner_flags(p)
        if step == "extract":
            p.add_argument("--layout-dpi", type=float, default=100.0, help="layout render resolution")
            p.add_argument(
                "--crop-dpi", type=float, default=200.0, help="crop and OCR resolution (>= 2x layout)"
            )
            _llm_flags(p, required=False)
        if step in ("classify", "cluster"):
            p.add_argument(
                "--clip", help="a Hugging Face CLIP / PathoCLIP checkpoint dir (default: tiny random)"
            )
            p.add_argument("--seed", type=int, default=0)
        if step == "classify":
            p.add_argument("--labels", help="review CSV with a filled 'corrected' column: retrain from it")
            p.add_argument("--steps", type=positive_int, default=300, help="head training steps")
        if step == "cluster":
            p.add_argument("--k", type=positive_int, default=3)
            p.add_argument("--n-init", type=positive_int, default=10, help="k-means++ restarts")
        if step == "generate":
            _llm_flags(p, required=True)
            p.add_argument("--tasks", default="mcq,description,reasoning,conversation")
            p.add_argument("--temperature", type=float, default=0.6)
            p.add_argument("--max-tokens", type=positive_int, default=4096)
        if step == "sample":
            p.add_argument("--n", type=positive_int, default=10000, help="RL MCQs (paper: 10k)")
            p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help=DEMO_HELP, description=DEMO_HELP)
    p.add_argument(
        "--out", default="runs/demo/curation", help="output directory (default: runs/demo/curation)"
    )
    p.add_argument("--workers", type=positive_int, default=2, help="extract processes (default 2)")
    _llm_flags(p, required=False)


def run(args: argparse.Namespace) -> int:
    from pathor1_jax.curation import steps

    if getattr(args, "beam_args", None) and args.runner != "beam":
        raise UserError(f"extra arguments {args.beam_args} are Beam flags: add --runner beam")
    if getattr(args, "crop_dpi", 1.0) < 2 * getattr(args, "layout_dpi", 0.0):
        raise UserError(f"--crop-dpi {args.crop_dpi} must be at least twice --layout-dpi {args.layout_dpi}")
    runner = (
        steps.Runner(args.runner, args.workers, tuple(args.beam_args)) if hasattr(args, "runner") else None
    )
    llm = None
    if getattr(args, "llm_url", None):
        if not args.llm_model:
            raise UserError("--llm-url needs --llm-model")
        llm = steps.LLMSpec(args.llm_url, args.llm_model, args.llm_key_env, args.concurrency)
    try:
        if args.step == "demo":
            from pathor1_jax.curation.demo import run_demo

            run_demo(args.out, args.workers, llm)
            return 0
        if args.step == "extract":
            table = steps.run_extract(
                args.inp, args.out, runner, llm, layout_dpi=args.layout_dpi, crop_dpi=args.crop_dpi
            )
        elif args.step == "filter":
            table = steps.run_filter(args.inp, args.out, runner)
        elif args.step == "classify":
            table = steps.run_classify(args.inp, args.out, args.clip, args.labels, args.steps, args.seed)
        elif args.step == "cluster":
            table = steps.run_cluster(args.inp, args.out, args.clip, args.k, args.n_init, args.seed)
        elif args.step == "generate":
            table = steps.run_generate(
                args.inp, args.out, llm, tuple(args.tasks.split(",")), args.temperature, args.max_tokens
            )
        elif args.step == "qc":
            table = steps.run_qc(args.inp, args.out, runner)
        else:
            table = steps.run_sample(args.inp, args.out, args.n, args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    print(table)
    return 0
