#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, when missing: Postfix (smtpd, smtp-sink,
# postqueue) for the end-to-end tests, libmilter-dev and gcc for pymilter and the C filters;
# for tests/deploy promtool (package prometheus), systemd-analyze (systemd) and Sendmail's m4
# macros (sendmail-cf, m4; only the macros, not Sendmail, which would replace Postfix).
# Postfix is preseeded so apt writes no /etc/postfix/main.cf and starts nothing on port 25;
# the policy-rc.d below keeps the prometheus package from starting its daemon, and it is
# disabled at boot as well: we only want its promtool.
set -euo pipefail

packages=(postfix libmilter-dev gcc make prometheus systemd sendmail-cf m4)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${missing[*]}; run as root or install them with apt-get" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "system-deps: installing ${missing[*]}" >&2
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
  # Works without a running systemd (it edits the unit links and the SysV rc links).
  systemctl disable prometheus.service >/dev/null 2>&1 || update-rc.d prometheus disable || true
fi
