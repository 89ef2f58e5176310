"""Optional TLS and mutual TLS on every gRPC server and client, with certificates from files.

A throwaway CA (made with `cryptography`) signs a server certificate for 127.0.0.1/localhost and a
client certificate; a second, rogue CA signs another client certificate. The real embedder
(random weights), indexer and gateway run with mutual TLS between all of them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from conftest import DEMO_PHOTOS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apps import cli
from cbir.channels import ClientTls, open_channel
from cbir.client import GatewayClient
from cbir.health import wait_until_serving
from cbir.settings import ServerSettings
from services.embedder.server import EmbedderServer
from services.embedder.settings import EmbedderSettings
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings
from services.indexer.server import IndexerServer
from services.indexer.settings import IndexerSettings

StatusCode = grpc.StatusCode
pytestmark = pytest.mark.slow  # the real services, VGG-16 included


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Ca:
    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem, _ = _write(folder / name, self.key, self.cert)

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(self.folder / name, key, builder.sign(self.key, hashes.SHA256()))


class Pki:
    def __init__(self, folder: Path):
        self.ca = Ca(folder, "cbir-test-ca")
        self.server_cert, self.server_key = self.ca.issue("cbir-server", server=True)
        self.client_cert, self.client_key = self.ca.issue("cbir-client", server=False)
        self.rogue = Ca(folder, "rogue-ca")
        self.rogue_cert, self.rogue_key = self.rogue.issue("intruder", server=False)

    def server(self, mutual: bool = True) -> dict:
        return dict(tls_cert=self.server_cert, tls_key=self.server_key,
                    tls_client_ca=self.ca.pem if mutual else None)

    def client(self) -> ClientTls:
        return ClientTls(ca=self.ca.pem, cert=self.client_cert, key=self.client_key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_stack(pki, random_embedder, bundle):
    """Embedder, indexer and gateway, each serving mutual TLS; the gateway reaches both upstreams with the
    client certificate."""
    embedder = EmbedderServer(EmbedderSettings(port=0, metrics_port=None, weights="random", random_seed=7,
                                               **pki.server()))
    embedder.start()
    embedder.load(random_embedder)
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=bundle.root, **pki.server()))
    indexer.start_serving()
    wait_until_serving(f"127.0.0.1:{indexer.port}", tls=pki.client())
    gateway = GatewayServer(GatewaySettings(
        port=0, metrics_port=None, embedder_target=f"127.0.0.1:{embedder.port}",
        indexer_target=f"127.0.0.1:{indexer.port}", upstream_tls_ca=pki.ca.pem,
        upstream_tls_cert=pki.client_cert, upstream_tls_key=pki.client_key, **pki.server(),
    ))
    gateway.start_serving()
    yield dict(gateway=f"127.0.0.1:{gateway.port}", embedder=f"127.0.0.1:{embedder.port}",
               indexer=f"127.0.0.1:{indexer.port}")
    for server in (gateway, indexer, embedder):
        server.stop(0)


def test_a_client_with_the_cas_certificate_searches_over_mutual_tls(pki, mtls_stack):
    """GatewayClient with the CA and a client certificate: searches work end to end (gateway -> embedder and
    indexer over mutual TLS too), and GetStatus says both upstreams are reached over TLS."""
    with GatewayClient(mtls_stack["gateway"], timeout_s=60, tls_ca=pki.ca.pem, tls_cert=pki.client_cert,
                       tls_key=pki.client_key) as client:
        response = client.search_image((DEMO_PHOTOS / "skimage-coffee.jpg").read_bytes(), k=3)
        assert response.hits[0].item_id == "skimage-coffee.jpg"
        status = client.status()
    assert {u.name: (u.state, u.tls, u.channel) for u in status.upstreams} == {
        "embedder": ("SERVING", True, "READY"), "indexer": ("SERVING", True, "READY")}
    assert status.compatible


@pytest.mark.parametrize("who", ["no client certificate", "certificate of another CA", "plaintext",
                                 "server not trusted"])
def test_clients_without_a_valid_certificate_cannot_reach_any_service(pki, mtls_stack, who):
    """Each service refuses the handshake: no certificate, one signed by a rogue CA, no TLS at all, or a
    client that does not trust the server's CA; the call fails with UNAVAILABLE and nothing is answered."""
    tls = {
        "no client certificate": ClientTls(ca=pki.ca.pem),
        "certificate of another CA": ClientTls(ca=pki.ca.pem, cert=pki.rogue_cert, key=pki.rogue_key),
        "plaintext": None,
        "server not trusted": ClientTls(ca=pki.rogue.pem, cert=pki.client_cert, key=pki.client_key),
    }[who]
    for target in mtls_stack.values():
        with open_channel(target, tls=tls) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() is StatusCode.UNAVAILABLE, (target, caught.value.details())


def test_a_gateway_without_the_client_certificate_sees_its_upstreams_unreachable(pki, mtls_stack):
    """A second gateway that trusts the CA but has no client certificate: GetStatus reports both upstreams
    UNREACHABLE (handshake refused) and a search fails with UNAVAILABLE naming the embedder."""
    gateway = GatewayServer(GatewaySettings(
        port=0, metrics_port=None, embedder_target=mtls_stack["embedder"], indexer_target=mtls_stack["indexer"],
        upstream_tls_ca=pki.ca.pem,
    ))
    gateway.start_serving()
    try:
        with GatewayClient(f"127.0.0.1:{gateway.port}", timeout_s=30) as client:
            status = client.status()
            assert {u.name: u.state for u in status.upstreams} == {"embedder": "UNREACHABLE", "indexer": "UNREACHABLE"}
            with pytest.raises(grpc.RpcError) as caught:
                client.search_image((DEMO_PHOTOS / "skimage-coffee.jpg").read_bytes(), k=3)
            assert caught.value.code() is StatusCode.UNAVAILABLE and "embedder" in caught.value.details()
    finally:
        gateway.stop(0)


def test_server_tls_without_client_certificates_and_the_cli(pki, random_embedder, bundle, tmp_path):
    """TLS without client authentication (tls_cert + tls_key only): `cbir search --tls-ca` reaches a TLS
    gateway in front of plaintext upstreams; without --tls-ca the CLI cannot."""
    indexer = IndexerServer(IndexerSettings(port=0, metrics_port=None, bundle=bundle.root))
    indexer.start_serving()
    embedder = EmbedderServer(EmbedderSettings(port=0, metrics_port=None, weights="random", random_seed=7))
    embedder.start()
    embedder.load(random_embedder)
    gateway = GatewayServer(GatewaySettings(
        port=0, metrics_port=None, embedder_target=f"127.0.0.1:{embedder.port}",
        indexer_target=f"127.0.0.1:{indexer.port}", **pki.server(mutual=False),
    ))
    gateway.start_serving()
    try:
        wait_until_serving(f"127.0.0.1:{indexer.port}")
        image = str(DEMO_PHOTOS / "skimage-coffee.jpg")
        ok = CliRunner().invoke(cli.main, ["search", image, "--k", "2", "--gateway", f"127.0.0.1:{gateway.port}",
                                           "--tls-ca", str(pki.ca.pem)])
        assert ok.exit_code == 0, ok.output
        assert "skimage-coffee.jpg" in ok.output
        plain = CliRunner().invoke(cli.main, ["search", image, "--gateway", f"127.0.0.1:{gateway.port}"])
        assert plain.exit_code != 0 and "UNAVAILABLE" in plain.output
    finally:
        for server in (gateway, embedder, indexer):
            server.stop(0)


def test_tls_settings_come_from_the_environment_and_are_checked(pki, monkeypatch, tmp_path):
    """CBIR_<SERVICE>_TLS_CERT/_KEY/_CLIENT_CA are read like every setting; a certificate without its key,
    a client CA without a certificate, or a file that is not PEM are refused with a clear message."""
    monkeypatch.setenv("CBIR_INDEXER_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("CBIR_INDEXER_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("CBIR_INDEXER_TLS_CLIENT_CA", str(pki.ca.pem))
    settings = IndexerSettings()
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (pki.server_cert, pki.server_key, pki.ca.pem)
    assert settings.grpc_service_kwargs()["tls_client_ca"] == pki.ca.pem
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerSettings(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="needs tls_cert"):
        ServerSettings(tls_client_ca=pki.ca.pem)
    with pytest.raises(ValueError, match="upstream_tls_cert and upstream_tls_key"):
        GatewaySettings(upstream_tls_cert=pki.client_cert)
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    from cbir.grpc_server import GrpcService

    with pytest.raises(OSError, match="not a PEM file"):
        GrpcService("x", port=0, tls_cert=not_pem, tls_key=pki.server_key).start()


def test_the_ui_reaches_the_gateway_with_its_tls_settings(pki, mtls_stack, monkeypatch):
    """CBIR_UI_GATEWAY_TLS_CA/_CERT/_KEY reach the UI's gateway client: with them the UI's client gets the
    mutual-TLS gateway's status; the UI process itself is not started (its server is replaced)."""
    import ui.server
    from ui.settings import UiSettings

    monkeypatch.setenv("CBIR_UI_GATEWAY_TLS_CA", str(pki.ca.pem))
    monkeypatch.setenv("CBIR_UI_GATEWAY_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("CBIR_UI_GATEWAY_TLS_KEY", str(pki.client_key))
    seen = {}

    class NoServer:
        def __init__(self, settings, client):
            seen["status"] = client.status()
            seen["tls"] = client.tls

        def run(self):
            pass

    monkeypatch.setattr(ui.server, "UiServer", NoServer)
    ui.server.serve(UiSettings(gateway_target=mtls_stack["gateway"], port=0))
    assert seen["tls"] == ClientTls(ca=pki.ca.pem, cert=pki.client_cert, key=pki.client_key)
    assert seen["status"].compatible
