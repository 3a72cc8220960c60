"""policyd: SPF, iprev and DKIM policy for Postfix and Sendmail."""
__version__ = "0.1.0"
