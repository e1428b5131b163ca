"""A local S3 endpoint for development and tests: `moto_server` (moto[server]) on 127.0.0.1, a bucket created.

    python infra/local_s3.py                      serve on 127.0.0.1:5555 with bucket "semid" until Ctrl-C, after
                                                  printing the settings to export (`make s3`)
    python infra/local_s3.py --port 0 -- pytest   start it on a free port, run the command with S3_TEST_ENDPOINT and
                                                  AWS_ENDPOINT_URL_S3 pointing at it, stop it, exit with the
                                                  command's status (`make test`)

Credentials: the environment's AWS_* when set, else dummy ones (moto accepts any). Nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3

START_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int) -> subprocess.Popen:
    """moto_server on 127.0.0.1:port, once it accepts connections."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"moto_server exited {server.returncode} on port {port} (port in use?)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"moto_server did not listen on 127.0.0.1:{port} within {START_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5555, help="0: a free port")
    parser.add_argument("--bucket", default="semid", help="the bucket to create")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...: run it against the endpoint")
    args = parser.parse_args()
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"S3_TEST_ENDPOINT": url, "AWS_ENDPOINT_URL_S3": url,
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        # Dummies, but recognisable: the security test greps every output for the credentials in use.
        settings |= {"AWS_ACCESS_KEY_ID": "AKIALOCALS3DUMMY7KEY", "AWS_SECRET_ACCESS_KEY": "localS3Dummy/semid+5e2a9c"}
    os.environ.update(settings)
    server = start(port)
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=args.bucket)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if command:
            sys.exit(subprocess.run(command).returncode)
        print(f"local S3 on {url}, bucket {args.bucket}; in another shell:")
        for key, value in settings.items():
            print(f"export {key}={value}")
        print(f"then set storage.root: s3://{args.bucket}/lake in params.yaml. Ctrl-C stops it.")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
