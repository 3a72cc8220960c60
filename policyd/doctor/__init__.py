"""`policyd check`: a doctor for the deployment's mail DNS (issue #10).

command.py runs it and prints the findings; findings.py is their
vocabulary; lookups.py asks every question with its three outcomes;
resolver.py, domains.py, dkimrecord.py, addresses.py, nat.py and
postfix.py each check one thing, and say the fix.
"""
