"""Child process for the crash tests: writes until it is killed, printing every acknowledgement.

argv: path mode seed. Modes: ``set`` (8 threads of single-entry and 20-entry txs), ``replicate``
(a replica applying batches exported from ``path + '-source'``). A line ``ack <id> <alh hex>`` is
printed only after the call returned, i.e. after the commit was durable.
"""
import random
import sys
import threading

from immucore.database import open_database


def main():
    path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out_lock = threading.Lock()

    def ack(header):
        with out_lock:
            sys.stdout.write(f"ack {header.id} {header.alh().hex()}\n")
            sys.stdout.flush()

    if mode == "set":
        db = open_database(path)
        sys.stdout.write("ready\n")
        sys.stdout.flush()

        def writer(worker):
            rng = random.Random(seed * 100 + worker)
            n = 0
            while True:
                size = rng.choice((1, 1, 20))
                kvs = {f"w{worker}-{n}-{i}".encode(): rng.randbytes(rng.randrange(0, 300))
                       for i in range(size)}
                ack(db.set(kvs))
                n += 1

        threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        source = open_database(path + "-source")
        db = open_database(path, replica=True)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        rng = random.Random(seed)
        while True:
            start = db.current_state().tx_id + 1
            blobs = source.export_txs(start, rng.randrange(1, 500))
            if not blobs:
                return
            for header in db.replicate_txs(blobs):
                ack(header)


if __name__ == "__main__":
    main()
