"""The per-event baseline: what a tutorial writes, kept here to measure digitwatch against.

watchdog `on_created` -> cv2.imread -> resize to 28x28 -> one torch forward pass -> JSON.
No claims, no CSV, no durability, no batching. Usage: baseline_handler.py INBOX OUTBOX WEIGHTS
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import cv2
import torch
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from digitwatch.model import load_torch_model


class Handler(FileSystemEventHandler):
    def __init__(self, outbox: Path, model: torch.nn.Module) -> None:
        self.outbox = outbox
        self.model = model

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = Path(str(event.src_path))
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            return
        x = torch.from_numpy(cv2.resize(img, (28, 28))).float().div(255.0)
        x = (x - 0.1307) / 0.3081
        with torch.no_grad():
            probs = torch.softmax(self.model(x.view(1, 784)), dim=1)[0]
        digit = int(probs.argmax())
        (self.outbox / f"{path.name}.json").write_text(
            json.dumps({"input": path.name, "digit": digit, "confidence": float(probs[digit])})
        )


def main() -> None:
    inbox, outbox, weights = (Path(a) for a in sys.argv[1:4])
    torch.set_num_threads(1)
    model = load_torch_model(weights)
    observer = Observer()
    observer.schedule(Handler(outbox, model), str(inbox), recursive=False)
    observer.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    observer.stop()
    observer.join()


if __name__ == "__main__":
    main()
