"""Where official and trained checkpoints live, and the code that fetches and opens them.

    registry.py            REGISTRY: the official files (URL, size, sha256, format)
    downloader.py          weights_dir, download (resumable, verified, atomic), fetch, fetch_first,
                           file_or_fetch; the datasets' archives for data.py's --download:
                           fetch_coco, fetch_karpathy, fetch_cifar100
    safetensors_format.py  read_safetensors / write_safetensors, by hand
    pickle_scan.py         the opcode pre-scan every pickle passes before it is unpickled
    unpickler.py           the allow-list: what a pickle may ask for; load_pickle
    readers.py             load_state_dict / load_checkpoint for PyTorch files (zip, legacy,
                           TorchScript) without running their code; save_checkpoint (atomic);
                           check_optimizer_state (what AdamW saves, before --resume loads it);
                           check_state_dict / check_config, every model loader's checks
    checkpoints.py         train.py's checkpoints: save_run and resume_run (a run's state
                           written, read back), read_checkpoint (as data, earlier layouts
                           upgraded), flag, flag_parser and stored_flags (a flag's declaration;
                           the command line read off them; a checkpoint's flags checked against
                           them and the command line's), Parser and one_line_errors (both entry
                           points' errors in one line), clipcap_row and eval_report (what --eval
                           prints: the figures and ClipCap's row they compare with), start_of_run
                           and end_of_run (a training run's first lines and last), rebuild (a
                           model from a checkpoint's configs, checked), hold_run_dir (one run at
                           a time writes a run directory) and refuse_held_run (a new run never
                           replaces one unasked); the pictures a run leaves there: log_record
                           (log.jsonl), draw_log (loss_curve.png), contact_sheet and
                           judged_sheet (contact_sheet.png), save_picture
    tokenizer_tables.py    what tokenizer.py builds from: read_merges, read_json_vocab, read_gzip_merges,
                           check_merges (the official vocabulary files, checked), unicode_classes and
                           char_class (the Unicode classes its pre-token patterns need, for `re`)

Downloaded and trained checkpoints are stored in this directory (or $MINIMODAL_WEIGHTS) and
never committed; only weights/vocab/ (tokenizer files) is.
"""
from .checkpoints import (TASKS, FlagsRefused, Parser, clipcap_row, contact_sheet, draw_log, end_of_run, eval_report,
                          flag, flag_parser, hold_run_dir, judged_sheet, log_record, loss_curve, one_line_errors,
                          read_checkpoint, rebuild, refuse_held_run, resume_run, run_ended, save_picture, save_run,
                          start_of_run, stored_flags, upgrade)
from .downloader import (ChecksumMismatch, WeightsUnavailable, download, fetch, fetch_cifar100, fetch_coco,
                         fetch_first, fetch_karpathy, file_or_fetch, find_in_hub_cache, weights_dir)
from .readers import (check_config, check_optimizer_state, check_state_dict, load_checkpoint,
                      load_state_dict, save_checkpoint)
from .registry import REGISTRY, WeightsFile
from .safetensors_format import read_safetensors, read_safetensors_metadata, write_safetensors
from .unpickler import PLACEHOLDER_PREFIXES, Placeholder, UnsafeCheckpointError, load_pickle

__all__ = [
    "REGISTRY", "WeightsFile", "weights_dir", "download", "fetch", "fetch_first", "file_or_fetch",
    "find_in_hub_cache", "fetch_coco", "fetch_karpathy", "fetch_cifar100",
    "WeightsUnavailable", "ChecksumMismatch",
    "read_safetensors", "read_safetensors_metadata", "write_safetensors",
    "load_state_dict", "load_checkpoint", "save_checkpoint", "check_state_dict", "check_config",
    "check_optimizer_state", "TASKS", "read_checkpoint", "save_run", "resume_run", "upgrade", "flag", "flag_parser",
    "Parser",
    "one_line_errors", "stored_flags", "FlagsRefused", "clipcap_row", "eval_report", "start_of_run", "end_of_run",
    "refuse_held_run", "rebuild", "hold_run_dir", "run_ended", "log_record", "draw_log", "loss_curve", "contact_sheet",
    "judged_sheet", "save_picture",
    "UnsafeCheckpointError", "Placeholder", "PLACEHOLDER_PREFIXES", "load_pickle",
]
