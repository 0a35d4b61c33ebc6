"""`gptforge eval`: score a model on val / hellaswag / mmlu / lambada; print a table, optionally write JSON."""

from __future__ import annotations

import argparse
import sys

from ._options import add_device_options, add_quantize_option, resolve_device_for
from ..errors import UserError
from ..numeric import NON_NEGATIVE_INT, POSITIVE_INT


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model on held-out text and benchmarks",
        description="Evaluate a model: val (loss, perplexity, bits-per-byte), hellaswag (acc, acc_norm), mmlu "
                    "(per-subject and average accuracy), lambada (last-word accuracy, perplexity). Scoring "
                    "follows lm-evaluation-harness.")
    p.add_argument("--model", required=True, help="run directory, checkpoint, .safetensors, hf:DIR or preset name")
    p.add_argument("--task", action="append", required=True, metavar="TASK",
                   help="val, hellaswag, mmlu or lambada; repeat for several")
    p.add_argument("--data", action="append", default=[], metavar="[TASK=]PATH",
                   help="local file/folder or hf:OWNER/NAME[:CONFIG]; with several tasks write TASK=PATH. "
                        "Without it a benchmark reads its Hugging Face dataset (needs the network)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="score only the first N items (val: N windows)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--shots", type=NON_NEGATIVE_INT, default=0, help="mmlu: solved dev examples per prompt (default 0)")
    p.add_argument("--split", default="test", help="mmlu: split to evaluate (test, val or dev; default test)")
    p.add_argument("--stride", type=POSITIVE_INT, default=None,
                   help="val: tokens scored per window after the first (default: half the context for text "
                        "files, the whole context for prepared splits)")
    p.add_argument("--json", metavar="OUT", help="write the results (and provenance) to this JSON file")
    p.add_argument("--samples", action="store_true", help="include per-item log-likelihoods in the JSON")
    add_device_options(p, dtype_note="; log-probs are fp32 anyway")
    add_quantize_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..devices import dtype_name, resolve_dtype
    from ..evals import runner
    from ..evals.report import format_table, to_json, write_json
    from ..loading import default_tokenizer, load_model, resolve_model_source

    tasks = runner.check_tasks(args.task)
    data = runner.parse_data(args.data, tasks)
    options = runner.EvalOptions(shots=args.shots, mmlu_split=args.split, stride=args.stride)
    if args.json:
        from ..outputs import EVAL_REPORT, check_output
        # an earlier report is replaced (eval's own output); any other file, or what eval reads, never is
        check_output(args.json, EVAL_REPORT, replace=True, option="--json",
                     inputs={"--model": args.model, "--data": list(data.values())})
    device = resolve_device_for(args)
    dtype = resolve_dtype(args.dtype, device)
    for task in tasks:  # read every task's data before spending time on the model
        runner.load_task(task, data.get(task), args.limit, options)

    source = resolve_model_source(args.model)
    model, tokenizer = load_model(source, device, dtype)
    tokenizer = tokenizer or default_tokenizer(model, args.model)
    if args.quantize is not None:  # scored as `sample --quantize` would generate
        from ..generation import prepare_for_decoding
        prepare_for_decoding(model, quantize=args.quantize, weights_file=source.weights)

    results = runner.run_tasks(model, tokenizer, tasks, data, args.limit, args.batch_size, options,
                               progress=not args.no_progress and sys.stderr.isatty())
    print(format_table(results))
    for result in results:
        if result.skipped.count > len(result.skipped.examples):
            print(f"warning: {result.task}: {result.skipped.count} items skipped in all "
                  f"(the first {len(result.skipped.examples)} are listed above)", file=sys.stderr)
    if args.json:
        meta = {"model": args.model, **source.provenance(), "device": str(device), "dtype": dtype_name(dtype),
                "batch_size": args.batch_size, "limit": args.limit, "shots": args.shots,
                "quantize": args.quantize}
        write_json(args.json, to_json(results, meta, samples=args.samples))
        print(f"results written to {args.json}")
    return 0
