"""HTTP/1.1 requests written by hand on a socket of their own: what a client that stalls, leaves
early or sends a head a library would refuse to send looks like to a server."""
import socket


def raw_request(port, head, body=b""):
    """A socket that has sent `head` and `body` (as much of the body as a client chooses to send)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(head + body)
    return client


def status_of(client):
    """The HTTP status a server answered on `client`, or None where it closed without one."""
    answer = b""
    while b"\r\n" not in answer:
        chunk = client.recv(4096)
        if not chunk:
            return None
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def post_head(length, path="/", headers=None):
    """The head of a raw POST of `length` body bytes to `path`, with `headers` (by default raw bytes'
    Content-Type)."""
    headers = headers or {"Content-Type": "application/octet-stream"}
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + f"Content-Length: {length}\r\n\r\n").encode()
