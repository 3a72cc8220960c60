"""`policyd check`: a doctor for the deployment's mail DNS (issue #10).

command.py runs it and prints the findings; findings.py is their
vocabulary; lookups.py asks every question with its three outcomes;
resolver.py, domains.py (DKIM records judged by signing/record.py, as
`policyd dkim test` judges them), addresses.py, nat.py and
postfix.py each check one thing, and say the fix.
"""
