"""A real S3-compatible server for tests: moto's, in a process of its own on a free port."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Credentials moto accepts (it checks none unless told to); set in the environment, as an operator would.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mjctl-test-key", "AWS_SECRET_ACCESS_KEY": "mjctl-test-secret"}

_SERVE = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("port", server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test closes our stdin
server.stop()
"""


class MotoServer:
    """moto's S3 server on 127.0.0.1 (a free port, or the port given, to come back where it was)."""

    def __init__(self, port: int = 0, *, auth_after: int | None = None):
        pytest.importorskip("moto", reason="the S3 store's tests need moto[server] (pip install -e '.[test]')")
        env = {**os.environ, **CREDENTIALS}
        if auth_after is not None:  # check credentials against moto's IAM after that many requests
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"moto did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **credentials):
        import boto3
        from botocore.config import Config

        keys = {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], **credentials}
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}), **keys)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str) -> dict[str, bytes]:
        """Every object of the bucket, key -> bytes."""
        client = self.client()
        found = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in found}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def s3_overrides(server_url: str, bucket: str, prefix: str = "mjctl", **more) -> dict:
    """make_settings overrides whose result store is s3://bucket/prefix on server_url, with short timeouts."""
    return {"images__store": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            "images__s3_endpoint_url": server_url, "images__s3_region": "us-east-1",
            "images__s3_connect_timeout": 1.0, "images__s3_read_timeout": 1.0, "images__s3_attempts": 1, **more}
