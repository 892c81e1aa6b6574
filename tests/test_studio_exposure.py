"""Who can reach the studio: this machine only unless --listen, a login with --auth, and no file
served outside the outputs and temporary folders."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

import app
from tests.helpers import free_port

pytestmark = pytest.mark.browser


def test_it_serves_this_machine_only_unless_told_to_listen():
    assert app.parse_args([]).host == "127.0.0.1"
    assert app.parse_args(["--listen"]).host == "0.0.0.0"
    assert app.parse_args(["--listen", "--host", "192.168.1.5"]).host == "192.168.1.5"


def test_logins_come_from_flags_and_a_file(tmp_path):
    path = tmp_path / "logins.txt"
    path.write_text("# the team\nana:s3cret:with:colons\n\n bo : pw \n")
    args = app.parse_args(["--auth", "me:pass", "--auth-file", str(path)])
    assert args.logins == [("me", "pass"), ("ana", "s3cret:with:colons"), ("bo", "pw")]


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "--auth 'nopassword': a login must be USER:PASSWORD"),
    (["--auth", ":pw"], "a login must be USER:PASSWORD with neither part empty"),
    (["--auth-file", "/nonexistent/logins"], "cannot read the auth file /nonexistent/logins"),
])
def test_a_bad_login_is_refused_saying_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(argv)
    assert message in capsys.readouterr().err


def test_an_auth_file_with_a_bad_line_names_the_line(tmp_path, capsys):
    path = tmp_path / "logins.txt"
    path.write_text("ana:pw\nbo\n")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth-file", str(path)])
    assert f"{path} line 2: a login must be USER:PASSWORD" in capsys.readouterr().err


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    args = app.parse_args(["--outputs", str(outputs), "--device", "cpu", "--auth", "artist:brush"])
    studio = app.make_studio(args)
    port = free_port()
    server = app.launch(studio, args.host, port, block=False, logins=args.logins)
    yield studio, f"http://127.0.0.1:{port}"
    server.close()


def test_a_login_is_asked_for_and_checked(guarded):
    _, url = guarded
    with httpx.Client(base_url=url) as stranger:
        assert stranger.get("/config").status_code == 401
        assert stranger.post("/login", data={"username": "artist", "password": "wrong"}).status_code >= 400
        assert stranger.get("/config").status_code == 401
    with httpx.Client(base_url=url) as artist:
        assert artist.post("/login", data={"username": "artist", "password": "brush"}).status_code == 200
        assert artist.get("/config").status_code == 200


def test_no_file_outside_the_outputs_is_served(guarded, tmp_path):
    studio, url = guarded
    day = studio.writer.root / "2026-01-01"
    day.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(day / "00001-1.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the network")
    with httpx.Client(base_url=url) as artist:
        artist.post("/login", data={"username": "artist", "password": "brush"})
        assert artist.get(f"/gradio_api/file={day / '00001-1.png'}").status_code == 200
        for path in (secret, "/etc/passwd", f"{studio.writer.root}/../{secret.parent.name}/secret.txt",
                     f"{day}/../../../../../../etc/passwd"):
            response = artist.get(f"/gradio_api/file={path}")
            assert response.status_code in (403, 404), (path, response.status_code)
            assert "not for the network" not in response.text and "root:" not in response.text
