"""bert-compiler: Hugging Face BERT-family encoders compiled into verified inference engines.

Its wings, top to bottom (each imports only from the wings below it; pyproject.toml's
import-linter contracts say so and the tests run them):

    cli/         the `bert-compile` command: commands, option groups, --config, doctor
    run.py       the pipeline: the stages chained, what is up to date skipped
    bench/       `bert-compile bench`: engines beside their peers on real text
    triton/      the model repository, its gate, its Python-backend models, `serve`
    stages/      export, simplify, fuse, calibrate (and its sweep), build, verify (and its
                 INT8 fallback); layout, the OUT tree
    runtime/     the Encoder (texts in, outputs in order), tokenization, parity measures
    models/      model folders validated and loaded; the registered architectures
    engines/     the backends (ONNX Runtime, the torch engine, TensorRT) behind one registry
    calibration/ INT8 and fp8 ranges, Q/DQ graphs, the bundled data
    core/        artifacts and manifests, errors, locks, output folders, targets
"""
