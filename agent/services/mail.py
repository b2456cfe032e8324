"""Outgoing mail: SMTP (plain, STARTTLS or implicit TLS), a console backend for development, null.

Mails are sent from a background thread after the request's transaction committed, so an
endpoint such as ``/forgot-password`` answers in the same time whether or not a mail goes out,
and a slow SMTP server never holds a request. Failures are logged without the message body:
bodies carry reset links and codes, which never reach a log.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from email.errors import MessageError
from email.message import EmailMessage
from email.utils import formatdate
from email.utils import make_msgid
from email.utils import parseaddr

from ..config import Settings

log = logging.getLogger("headlesskey.mail")


class Mailer:
    """Sends plain-text mail with the configured backend."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def build(self, to: str, subject: str, body: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.mail_from
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=False)
        domain = parseaddr(self.settings.mail_from)[1].rpartition("@")[2]
        msg["Message-ID"] = make_msgid(domain=domain or None)
        msg.set_content(body)
        return msg

    def send_later(self, to: str, subject: str, body: str) -> Future[None] | None:
        """Queue a mail; returns its future (tests may wait on it)."""
        if self.settings.mail_backend == "null":
            return None
        try:
            msg = self.build(to, subject, body)
        except (MessageError, ValueError, TypeError, AttributeError) as exc:
            # An address stored before addresses were checked as strictly as now; the header
            # parser can fail on one with AttributeError. The request's work is done: no 500.
            log.error("mail to %s not sent: %s", _mask(to), type(exc).__name__)
            return None
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hk-mail")
            return self._executor.submit(self._deliver, msg)

    def _deliver(self, msg: EmailMessage) -> None:
        try:
            if self.settings.mail_backend == "console":
                # Development only: the console backend prints the whole mail to stdout.
                head = "".join(f"{k}: {v}\n" for k, v in msg.items()
                               if k in {"From", "To", "Subject"})
                sys.stdout.write(f"\n----- mail -----\n{head}\n{msg.get_content()}"
                                 "----- end mail -----\n")
                sys.stdout.flush()
            else:
                self._smtp(msg)
        except (OSError, smtplib.SMTPException) as exc:
            log.error("mail to %s not sent: %s", _mask(str(msg["To"])), type(exc).__name__)

    def _smtp(self, msg: EmailMessage) -> None:
        s = self.settings
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if s.mail_security == "ssl":
            smtp = smtplib.SMTP_SSL(s.mail_host, s.mail_port, timeout=s.mail_timeout,
                                    context=context)
        else:
            smtp = smtplib.SMTP(s.mail_host, s.mail_port, timeout=s.mail_timeout)
        with smtp:
            if s.mail_security == "starttls":
                smtp.starttls(context=context)
            if s.mail_username:
                smtp.login(s.mail_username, s.mail_password)
            smtp.send_message(msg)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=wait)
                self._executor = None


def _mask(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``: enough to trace, not to harvest."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"
