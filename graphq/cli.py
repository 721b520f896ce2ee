"""The graphq command line: a thin wrapper over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from graphq.errors import GraphqError
from graphq.interrupts import SIGTERM_EXIT_STATUS, Terminated, handle_sigterm, restore_sigterm
from graphq.threads import busy_machine_hint


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other graphq error (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"graphq: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a count >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (argparse prints its own one-line usage error otherwise)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a count >= 0, got {value}")
    return value


def kd_setting(text: str) -> tuple[str, object]:
    """An argparse type: KEY=VALUE, the value read as YAML (numbers, true/false, [lists])."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for number in (int, float):  # YAML 1.1 reads 1e-2 as a string
        try:
            return key.strip(), number(value)
        except ValueError:
            pass
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"the value of {key} is not a number, word or [list]: {value!r}") from None


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="UTF-8 text to evaluate on (never the calibration text)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    parser.add_argument("--threads", type=non_negative_int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    _add_worker_args(parser)


def _add_worker_args(parser: argparse.ArgumentParser) -> None:
    """--workers / --ray-address (graphq.runtimes.workers; needs the ray extra)."""
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="run the independent work on N Ray workers (a local Ray cluster of N CPUs; 0 or 1: "
                        "this process); needs pip install 'graphq[ray]'")
    parser.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                        "starting one; --workers then sets the number of workers (default: the cluster's CPUs)")


def _worker_pool(args: argparse.Namespace):
    from graphq.runtimes.workers import WorkerPool

    return WorkerPool(workers=getattr(args, "workers", None), address=getattr(args, "ray_address", None))


def _add_symmetry_args(parser: argparse.ArgumentParser) -> None:
    """--sym / --asym (config field ``symmetric``; unset keeps the scheme's default)."""
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric (no zero point)")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False, help="asymmetric (zero point)")


def _add_sparsity_args(parser: argparse.ArgumentParser, lowbit: bool = True) -> None:
    """Sparsity (issue 10): pruning targets, and the W8A8S lowbit options."""
    parser.add_argument("--sparsity", type=float, help="fraction of each linear's weights to zero, in [0, 1) "
                        "(with a pruning --method: magnitude, wanda, sparsegpt)")
    parser.add_argument("--sparsity-pattern", help="N:M, e.g. 2:4 or 4:8: keep N of every M input channels")
    if lowbit:
        parser.add_argument("--sigma-factor", type=float, help="w8a8s: outliers beyond this many std (3 to 4, default 3)")
        parser.add_argument("--fraction", type=float, help="w8a8s: at most this fraction of a channel kept on 8 bits "
                            "as outliers (0.01 to 0.1, default 0.01)")


def build_parser() -> argparse.ArgumentParser:
    from graphq.version import __version__

    parser = _OneLineParser(prog="graphq", description="Quantize ONNX LLMs and verify them in onnxruntime.")
    parser.add_argument("--version", action="version", version=f"graphq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a Hugging Face folder or GGUF file to ONNX")
    export.add_argument("source", help="Hugging Face model folder or .gguf file")
    export.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: optimum's)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument("--dtype", default="fp32", help="fp32 (default), fp16 or bf16: weights rounded to it (the ONNX "
                        "still computes in float32, which onnxruntime CPU runs) and config.json torch_dtype")

    quantize = commands.add_parser("quantize", help="quantize the linear layers of an exported model")
    quantize.add_argument("model", help="export folder or model.onnx (tokenizer beside it)")
    quantize.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    quantize.add_argument("--config", help="YAML file of options; command-line options override it")
    quantize.add_argument("--scheme", help="w4a16 (default), w8a16, w3a16 (codebook weights only), w8a8 (static activations) or "
                          "w8a8-dynamic (per token)")
    quantize.add_argument("--group-size", type=int, help="input channels per scale: 32, 64, 128 (default), -1 per-channel")
    _add_symmetry_args(quantize)
    quantize.add_argument("--format", help="matmulnbits (default, onnxruntime) or qdq (DequantizeLinear, NPUs)")
    quantize.add_argument("--method", help="rtn (default, no data), awq, gptq, lut (codebook; data-free, or weighted "
                          "with --calib), or a sequence such as awq+gptq, awq+lut (calibrated layer by layer)")
    quantize.add_argument("--calib", help="calibration data: text, JSON or JSONL (field 'text', or 'src'/'tgt'); default: samples/")
    quantize.add_argument("--calib-texts", nargs="+", metavar="TEXT", help="calibration prompts given inline")
    quantize.add_argument("--calib-field", help="JSON/JSONL field holding the text (default 'text')")
    quantize.add_argument("--num-samples", type=int, help="calibration samples (default 128)")
    quantize.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 512)")
    quantize.add_argument("--damp", type=float, help="GPTQ damping, fraction of the mean Hessian diagonal (default 0.01)")
    quantize.add_argument("--act-order", action="store_const", const=True, help="GPTQ: quantize channels by descending activation")
    quantize.add_argument("--no-awq-clip", dest="awq_clip", action="store_const", const=False, help="AWQ: skip the weight clip search")
    quantize.add_argument("--propagate",
                          help="calibrated methods: carry each decoder layer's quantized outputs to the next (two "
                          "onnxruntime runs a layer) or its float outputs (one run, AutoAWQ's and NNCF's way); "
                          "default auto: float for awq alone, quantized when gptq or a pruning method is in --method")
    quantize.add_argument("--act-method", help="w8a8 activation ranges: minmax (default), percentile, entropy, mse, or auto (per layer, lowest output error)")
    quantize.add_argument("--percentile", type=float, help="percentile for --act-method percentile (default 99.99)")
    quantize.add_argument("--act-fallback", type=int, help="w8a8: keep activations float for the N input groups with the largest output error (default 0)")
    quantize.add_argument("--kv-cache", help="int8: calibrated per-head QDQ on the present.* key/value outputs")
    quantize.add_argument("--smooth", help="anti-outlier pass before W8A8: smoothquant or os+")
    quantize.add_argument("--smooth-alpha", help="smoothing strength in [0, 1] (default 0.5) or 'auto' (searched per layer)")
    quantize.add_argument("--smooth-all-linears", action="store_const", const=True,
                          help="also smooth inputs nothing can absorb (inserts an explicit Mul)")
    quantize.add_argument("--exclude", nargs="+", metavar="PATTERN", help="keep layers matching these glob/regex patterns float")
    quantize.add_argument("--quantize-lm-head", action="store_const", const=True, help="quantize lm_head too")
    quantize.add_argument("--seed", type=int)
    quantize.add_argument("--save-format", help="comma list of onnx, safetensors, numpy, params (quantization parameters "
                          "and fake-quant weights; default onnx,safetensors)")
    quantize.add_argument("--part-file-size", type=float, metavar="GB", help="shard the safetensors into files of at most GB")
    quantize.add_argument("--accuracy-level", type=int, help="MatMulNBits compute: 0 float (default), 4 int8 "
                          "activations per block (faster on CPU; verify measures the cost)")
    quantize.add_argument("--fuse-attention", action="store_const", const=True,
                          help="each layer's attention as one onnxruntime GroupQueryAttention node (faster decode; "
                          "positions from the attention mask, so batches must be right-padded)")
    quantize.add_argument("--no-pack", dest="pack", action="store_const", const=False, help="W4A16 artifacts: one int4 value per int8 byte")
    quantize.add_argument("--weight-format", help="uniform (default, integer grid) or a codebook with --method lut: lut "
                          "(k-means table per channel / --group-size), shared, nf4, iq4nl")
    quantize.add_argument("--lut-table-dtype", help="codebook table entries: float16 (default) or int8 (+ a float16 scale)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_worker_args(quantize)
    # Sensitivity-ranked precision (issue 14).
    quantize.add_argument("--disable-level", type=int, help="keep the N most sensitive linears float (or --fallback-scheme)")
    quantize.add_argument("--fallback-scheme", help="where --disable-level / --target-bits move linears (w8a16, ...)")
    quantize.add_argument("--target-bits", type=float, help="mixed precision: average bits per weight to spend (e.g. 4.5)")
    quantize.add_argument("--sensitivity", dest="sensitivity_file", help="ranking from 'graphq analyze' (default: analyse now)")
    quantize.add_argument("--sensitivity-windows", type=int, help="calibration windows a fresh analysis runs (default 2)")

    analyze = commands.add_parser("analyze", help="rank linears by what quantizing each alone does to the logits")
    analyze.add_argument("model", help="export folder or model.onnx (tokenizer beside it)")
    analyze.add_argument("-o", "--output", required=True, help="sensitivity JSON to write (e.g. sensitivity.json)")
    analyze.add_argument("--html", help="also write a self-contained HTML page with the charts here")
    analyze.add_argument("--config", help="YAML file of options; command-line options override it")
    analyze.add_argument("--scheme", help="w4a16 (default), w8a16, w8a8 or w8a8-dynamic")
    analyze.add_argument("--group-size", type=int, help="input channels per scale (default 128, -1 per-channel)")
    _add_symmetry_args(analyze)
    analyze.add_argument("--exclude", nargs="+", metavar="PATTERN", help="linears to leave out of the ranking")
    analyze.add_argument("--quantize-lm-head", action="store_const", const=True, help="rank lm_head too")
    analyze.add_argument("--calib", help="text, JSON or JSONL to take the windows from (default: samples/)")
    analyze.add_argument("--calib-field", help="JSON/JSONL field holding the text (default 'text')")
    analyze.add_argument("--windows", type=int, default=2, help="calibration windows (default 2)")
    analyze.add_argument("--seq-len", type=int, help="tokens per window (at most 128)")
    analyze.add_argument("--seed", type=int)
    analyze.add_argument("--overwrite", action="store_true", help="replace existing output files")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_worker_args(analyze)

    _add_sparsity_args(quantize)
    quantize.add_argument("--compress", action="store_const", const=True,
                          help="w8a8s: also write the compressed W8A8SC folders under OUT_DIR/w8a8sc (see graphq compress)")
    quantize.add_argument("--tp", dest="tp_size", type=int, help="with --compress: tensor-parallel ranks (default 1)")

    prune = commands.add_parser("prune", help="prune the linear layers of an export, weights left float (zeros in place)")
    prune.add_argument("model", help="export folder or model.onnx (tokenizer beside it)")
    prune.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    prune.add_argument("--method", required=True, help="magnitude (no data), wanda or sparsegpt (awq+wanda is not float)")
    for flag, kwargs in (("--calib", {}), ("--num-samples", {"type": int}), ("--seq-len", {"type": int}),
                         ("--damp", {"type": float}), ("--seed", {"type": int})):
        prune.add_argument(flag, **kwargs)
    prune.add_argument("--exclude", nargs="+", metavar="PATTERN", help="keep layers matching these patterns dense")
    prune.add_argument("--quantize-lm-head", action="store_const", const=True, help="prune lm_head too")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sparsity_args(prune, lowbit=False)

    compress = commands.add_parser("compress", help="W8A8S artifacts -> W8A8SC: per tensor-parallel rank, compressed tiles")
    compress.add_argument("artifacts", help="the output folder of 'graphq quantize --scheme w8a8s'")
    compress.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    compress.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to split the weights over (default 1)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    compress.add_argument("--quiet", action="store_true", help="no progress bar")

    # Artifact targets and dtypes (issue 13)
    quantize.add_argument("--target", help="artifact layout: mindie (default, msModelSlim V0), vllm-ascend "
                          "(msModelSlim ascendV1), compressed-tensors, gguf")
    quantize.add_argument("--dtype", help="serving dtype fp32, fp16 or bf16 of float tensors, scales and config.json "
                          "(default: the source's)")
    quantize.add_argument("--quantize-embeddings", help="int8 or int4: the token embedding (and a tied lm_head) too, "
                          "as GatherBlockQuantized (--format matmulnbits) or DequantizeLinear + Gather (qdq)")
    quantize.add_argument("--embedding-group-size", type=int, help="embedding values per scale along hidden (default 32)")
    quantize.add_argument("--embedding-method", help="rtn (default) or gptq: the tied lm_head's inputs calibrate the table")

    # Knowledge distillation (issue 12)
    quantize.add_argument("--kd", type=kd_setting, nargs="+", metavar="KEY=VALUE",
                          help="kd training settings (--method kd / awq+kd), e.g. num_epochs=2 learning_rate=5e-3 "
                          "train_samples=64 cutoff_len=256; the YAML form is a kd: mapping")
    quantize.add_argument("--device", help="where kd trains: auto (default: cuda if torch sees one), cpu, cuda")
    quantize.add_argument("--plan", help="per-layer plan file from 'graphq plan' (edited): each tensor's bits, group "
                          "size, symmetry and method")
    quantize.add_argument("--stage", choices=("weights", "activations", "export", "all"), default="all",
                          help="run one stage into the output folder, from the previous stage's checkpoint there: "
                          "weights (every weight rewritten), activations (ranges, KV cache), export (the files); "
                          "all (default) runs them in turn and resumes a run stopped after a finished stage")

    plan = commands.add_parser("plan", help="write the per-layer plan (dopt_config.json layout) the options imply")
    plan.add_argument("model", help="export folder or model.onnx")
    plan.add_argument("-o", "--output", required=True, help="plan JSON to write (e.g. plan.json)")
    plan.add_argument("--config", help="YAML file of options; command-line options override it")
    plan.add_argument("--scheme", help="default scheme of the linears (w4a16, w8a16, w8a8, ...)")
    plan.add_argument("--group-size", type=int, help="input channels per scale (default 128, -1 per-channel)")
    _add_symmetry_args(plan)
    plan.add_argument("--method", help="weight method of every entry (rtn, awq, gptq, awq+kd, ...)")
    plan.add_argument("--exclude", nargs="+", metavar="PATTERN", help="linears written as float (weight bit 16)")
    plan.add_argument("--quantize-lm-head", action="store_const", const=True, help="plan lm_head quantized too")
    plan.add_argument("--quantize-embeddings", help="int8 or int4: plan the token embedding quantized")
    plan.add_argument("--embedding-group-size", type=int, help="embedding values per scale (default 32)")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing plan file")

    rebuild = commands.add_parser("load-artifacts", help="rebuild a fake-quant ONNX model from safetensors + description")
    rebuild.add_argument("artifacts", help="folder with quant_model_description_*.json and its safetensors")
    rebuild.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    rebuild.add_argument("--float", dest="float_model", help="the float export (default: report.json's source_model)")
    rebuild.add_argument("--format", help="matmulnbits or qdq (default: the format the artifacts were quantized with)")
    rebuild.add_argument("--scheme", help="which description to use when the folder holds several")
    rebuild.add_argument("--numpy", action="store_true", help="read the numpy .npy dicts instead (uses pickle: trusted files only)")
    rebuild.add_argument("--fuse-attention", dest="fuse", action=argparse.BooleanOptionalAction,
                         help="attention as GroupQueryAttention nodes (default: as the quantize run did)")
    rebuild.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    inspect = commands.add_parser("inspect", help="what a model or artifact folder holds: layers by scheme, bits per weight, sizes")
    inspect.add_argument("path", help="model.onnx, an export/output folder, or an artifact folder")

    verify = commands.add_parser("verify", help="accuracy of a quantized model against its float model, overall and per layer")
    verify.add_argument("float_model", help="float export (folder or model.onnx)")
    verify.add_argument("quant_model", help="quantized model (folder or model.onnx)")
    verify.add_argument("--html", help="also write a self-contained HTML report here")
    verify.add_argument("--worst", type=non_negative_int, default=10, help="rows in the table of worst layers (default 10)")
    verify.add_argument("--overwrite", action="store_true", help="replace an existing --html file (never an input)")
    verify.add_argument("--speed", action="store_true",
                        help="also time prefill and greedy decode with the KV cache, float vs quantized")
    verify.add_argument("--speed-prompt", type=positive_int, default=128, help="--speed prompt tokens (default 128)")
    verify.add_argument("--speed-tokens", type=positive_int, default=64, help="--speed decoded tokens (default 64)")
    _add_eval_args(verify)

    evaluate = commands.add_parser("eval", help="perplexity of a model in onnxruntime")
    evaluate.add_argument("model", help="export folder or model.onnx (tokenizer beside it)")
    _add_eval_args(evaluate)

    compare = commands.add_parser("compare", help="logit agreement of two models in onnxruntime")
    compare.add_argument("reference", help="reference (float) model")
    compare.add_argument("candidate", help="model to compare against it")
    _add_eval_args(compare)
    return parser


def _quant_config(args: argparse.Namespace):
    from graphq.config import QuantConfig

    data = {}
    if getattr(args, "config", None):
        from_yaml = QuantConfig.from_yaml(args.config)
        given = getattr(from_yaml, "_given", None)
        data = {k: v for k, v in from_yaml.__dict__.items() if k != "_given" and (given is None or k in given)}
    # Every config field the parser has a flag for; flags left unset (None) keep the YAML's or the default value.
    for field in dataclasses.fields(QuantConfig):
        value = getattr(args, field.name, None)
        if field.name == "kd" and value is not None:  # KEY=VALUE pairs update the YAML's kd: mapping
            value = {**data.get("kd", {}), **dict(value)}
        if value is not None:
            data[field.name] = value
    return QuantConfig.from_dict(data)


def _run_verify(args: argparse.Namespace) -> int:
    """The CLI command: print the summary and the worst layers; --html writes the page; --json the numbers."""
    from graphq.evaluate import check_window_fits, read_text, require_finite, token_windows
    from graphq.model_io import resolve_model_file
    from graphq.tokenizer import load_tokenizer
    from graphq.verify import format_table, verify

    if args.html:  # before the work: never an input, a folder, or an existing file without --overwrite
        from graphq.output_files import check_output_file, model_input_files

        inputs = [Path(args.text)]
        for model in (args.float_model, args.quant_model):
            inputs += model_input_files(resolve_model_file(model))
        check_output_file(args.html, inputs, args.overwrite, "HTML report")
    text = read_text(args.text)
    for model in (args.float_model, args.quant_model):
        check_window_fits(model, args.ctx)
    windows = token_windows(load_tokenizer(resolve_model_file(args.float_model)), text, args.ctx, args.max_tokens)
    result = verify(args.float_model, args.quant_model, windows, threads=args.threads, progress=True, pool=args.pool)
    print(format_table(result, args.worst))
    require_finite(args.float_model, float_perplexity=result.float_ppl)
    require_finite(args.quant_model, quantized_perplexity=result.quant_ppl, mean_KL=result.mean_kl)
    speeds = None
    if args.speed:
        from graphq.speed import compare_speed, format_speed

        prompt = [token for window in windows for token in window][: args.speed_prompt]
        speeds = compare_speed({"float": args.float_model, "quantized": args.quant_model}, prompt, args.speed_tokens,
                               threads=args.threads)
        print(format_speed(speeds))
    if args.html:
        from graphq.report_html import write_html

        write_html(result, args.html)
        print(f"wrote {args.html}")
    if args.json:
        data = result.to_dict()
        if speeds is not None:
            data["speed"] = {name: speed.to_dict() for name, speed in speeds.items()}
        print(json.dumps(data))
    return 0


def run(args: argparse.Namespace) -> int:
    # The load is read before the work adds to it, and the hint printed once it is done: a refused input stays
    # one error line.
    hint = busy_machine_hint() if args.command in ("quantize", "analyze") and not getattr(args, "quiet", False) else None
    if hasattr(args, "workers"):  # the commands that distribute work: one pool, started and shut down here
        with _worker_pool(args) as pool:
            args.pool = pool
            code = _run(args)
    else:
        args.pool = None
        code = _run(args)
    if hint and code == 0:
        print(f"graphq: note: {hint}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from graphq.export import export

        print(export(args.source, args.output, opset=args.opset, overwrite=args.overwrite, dtype=args.dtype))
        return 0
    if args.command == "quantize":
        from graphq.model_io import check_output_dir
        from graphq.quantize import quantize

        if args.config:  # --overwrite must not delete the YAML file it was given
            check_output_dir(Path(args.output), [Path(args.config)], overwrite=True)
        result = quantize(args.model, _quant_config(args), args.output, overwrite=args.overwrite,
                          progress=not args.quiet, stage=args.stage, pool=args.pool)
        print(result.model_file if result.model_file.is_file() else result.output_dir)  # --save-format without onnx
        return 0
    if args.command == "plan":
        from graphq.layer_plan import default_plan
        from graphq.model_io import resolve_model_file
        from graphq.output_files import check_output_file, model_input_files, write_text_atomically

        check_output_file(args.output, model_input_files(resolve_model_file(args.model)), args.overwrite, "plan file")
        plan = default_plan(args.model, _quant_config(args))
        write_text_atomically(Path(args.output), json.dumps(plan, indent=2) + "\n")
        print(f"wrote {args.output}: {len(plan['layer_strategy'])} entries; edit it and pass --plan {args.output}")
        return 0
    if args.command == "analyze":
        from graphq.model_io import resolve_model_file
        from graphq.output_files import check_output_file, model_input_files, write_text_atomically
        from graphq.sensitivity import analyze, render_sensitivity_html

        inputs = model_input_files(resolve_model_file(args.model)) + ([Path(args.calib)] if args.calib else [])
        check_output_file(args.output, inputs, args.overwrite, "sensitivity file")
        if args.html:
            check_output_file(args.html, inputs + [Path(args.output)], args.overwrite, "HTML page")
        report = analyze(args.model, _quant_config(args), num_windows=args.windows, progress=not args.quiet,
                         pool=args.pool)
        print(report.save(args.output))
        if args.html:
            print(write_text_atomically(args.html, render_sensitivity_html(report)))
        return 0
    if args.command == "prune":
        from graphq.sparsify import prune

        prune(args.model, _quant_config(args), args.output, overwrite=args.overwrite, progress=not args.quiet)
        print(args.output)
        return 0
    if args.command == "compress":
        from graphq.artifacts.w8a8sc import compress

        print(compress(args.artifacts, args.output, tp=args.tp, overwrite=args.overwrite, progress=not args.quiet))
        return 0
    if args.command == "load-artifacts":
        from graphq.artifacts.rebuild import load_artifacts

        print(load_artifacts(args.artifacts, args.output, float_model=args.float_model, format=args.format,
                             numpy=args.numpy, scheme=args.scheme, overwrite=args.overwrite, fuse=args.fuse))
        return 0
    if args.command == "inspect":
        from graphq.artifacts.inspect import inspect_path

        print("\n".join(result.render() for result in inspect_path(args.path)))
        return 0
    if args.command == "verify":
        return _run_verify(args)
    from graphq.evaluate import check_window_fits, logit_agreement, perplexity, read_text, require_finite, token_windows
    from graphq.tokenizer import load_tokenizer
    from graphq.runtimes.ort import OrtCausalLM

    text = read_text(args.text)
    for model in [args.model] if args.command == "eval" else [args.reference, args.candidate]:
        check_window_fits(model, args.ctx)
    if args.command == "eval":
        model = OrtCausalLM(args.model, threads=args.threads)
        windows = token_windows(load_tokenizer(args.model), text, args.ctx, args.max_tokens)
        result = perplexity(model, windows, progress=True, pool=args.pool)
        print(f"perplexity {result.ppl:.4f} over {result.tokens} tokens ({result.windows} windows of {args.ctx}) in {result.seconds:.1f}s")
        if args.json:
            workers = args.pool.summary()
            print(json.dumps({"ppl": result.ppl, "tokens": result.tokens, **({"workers": workers} if workers else {})}))
        require_finite(args.model, perplexity=result.ppl)
        return 0
    reference = OrtCausalLM(args.reference, threads=args.threads)
    candidate = OrtCausalLM(args.candidate, threads=args.threads)
    from graphq.model_match import check_same_vocabulary

    check_same_vocabulary(args.reference, reference.session, args.candidate, candidate.session)
    windows = token_windows(load_tokenizer(args.reference), text, args.ctx, args.max_tokens)
    result = logit_agreement(reference, candidate, windows, progress=True, pool=args.pool)
    print(
        f"mean KL {result.mean_kl:.5f}  top-1 agreement {result.top1_agreement:.4f}  "
        f"logit cosine {result.mean_cosine:.5f}  over {result.tokens} positions"
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    require_finite(args.candidate, mean_kl=result.mean_kl, logit_cosine=result.mean_cosine)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_sigterm = handle_sigterm()
    try:
        return run(args)
    except GraphqError as exc:
        print(f"graphq: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno is None:
            raise
        # A path the system refuses (name too long, permission, no space, ...) that no check above anticipated:
        # still the user's environment, so one line; output folders have already removed their staging.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"graphq: error: {exc.strerror or exc}{where}: check the path, permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphq: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("graphq: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return SIGTERM_EXIT_STATUS
    finally:
        restore_sigterm(previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
