# Plan and apply a 3-node cluster against a mocked AWS provider (offline).

mock_provider "aws" {
  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_subnet" {
    defaults = { availability_zone = "eu-west-1a" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/kafka-node-1" }
  }
  mock_resource "aws_launch_template" {
    defaults = { id = "lt-0123456789abcdef0", latest_version = 1 }
  }
}

variables {
  app_name      = "kafka"
  node_image    = "ami-0123456789abcdef0"
  instance_type = "m6i.large"
  nodes = [
    { node_id = "1", node_ip = "10.0.1.11", node_subnet_id = "subnet-a" },
    { node_id = "2", node_ip = "10.0.2.12", node_subnet_id = "subnet-b" },
    { node_id = "3", node_ip = "10.0.3.13", node_subnet_id = "subnet-c" },
  ]
  node_files = [
    { node_id = "2", node_files_toupload = [
      { contents = "aGVsbG8K", destination = "/etc/kafka/extra.properties" },
      { content_from = "ssm:/kafka/2/jaas", destination = "/etc/kafka/jaas.conf" },
      { content_from = "secretsmanager:kafka/tls-key", destination = "/etc/kafka/tls.key" },
    ] },
  ]
  configure_command = ["/usr/local/bin/configure-kafka"]
  health_command    = ["/usr/local/bin/kafka-healthy"]
  security_groups   = ["sg-0123456789abcdef0"]
  data_volume = {
    size_in_gibs           = 100
    type                   = "gp3"
    mount_path             = "/var/lib/kafka"
    file_system_type       = "xfs"
    mount_params           = ["noatime"]
    mount_path_owner_user  = "kafka"
    mount_path_owner_group = "kafka"
  }
  roll_command = "true"
  # The teardown destroys what the runs applied: deletable volumes and interfaces (the default,
  # retained, refuses; see data.tftest.hcl and tests/retained).
  retain_on_destroy = false
}

run "plan_three_nodes" {
  command = plan

  assert {
    condition     = length(aws_autoscaling_group.node) == 3 && length(aws_network_interface.deletable) == 3 && length(aws_ebs_volume.deletable) == 3 && length(aws_launch_template.node) == 3
    error_message = "one group, interface, volume and launch template per node"
  }
  assert {
    condition     = alltrue([for id, eni in aws_network_interface.deletable : one(eni.private_ips) == { "1" = "10.0.1.11", "2" = "10.0.2.12", "3" = "10.0.3.13" }[id]])
    error_message = "each node's interface carries its fixed IP"
  }
  assert {
    condition     = alltrue([for lt in aws_launch_template.node : lt.metadata_options[0].http_tokens == "required"])
    error_message = "IMDSv2 is required"
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.deletable : v.encrypted]) && alltrue([for lt in aws_launch_template.node : lt.block_device_mappings[0].ebs[0].encrypted == "true"])
    error_message = "data and root volumes are encrypted"
  }
  assert {
    condition     = alltrue([for g in aws_autoscaling_group.node : one(g.initial_lifecycle_hook).default_result == "ABANDON" && one(g.initial_lifecycle_hook).lifecycle_transition == "autoscaling:EC2_INSTANCE_LAUNCHING"])
    error_message = "every group has a launching hook that abandons by default"
  }
  assert {
    condition     = alltrue([for g in aws_autoscaling_group.node : g.min_size == 1 && g.max_size == 1 && length(g.vpc_zone_identifier) == 1])
    error_message = "single-instance groups pinned to the node's subnet"
  }
  assert {
    condition     = strcontains(module.node_config["2"].yaml, "/etc/kafka/extra.properties") && !strcontains(module.node_config["1"].yaml, "extra.properties")
    error_message = "node files go to their node only"
  }
  assert {
    # The configuration carries every node file's content: root's alone, made 0600 (replacing
    # any earlier file) before a byte is written into it.
    condition     = alltrue([for lt in aws_launch_template.node : strcontains(base64decode(lt.user_data), "install -m 0600 /dev/null /etc/cps/attach.yml\ncat > /etc/cps/attach.yml <<'CPS_CONFIG'\n")])
    error_message = "the configuration is installed 0600 before its content is written"
  }
}

run "apply_three_nodes" {
  command = apply

  assert {
    condition     = length(terraform_data.roll) == 1
    error_message = "the roll is wired"
  }
  assert {
    condition     = terraform_data.roll[0].triggers_replace == { "1" = 1, "2" = 1, "3" = 1 }
    error_message = "the roll runs when any launch template version changes"
  }
  assert {
    condition     = output.node_ips == { "1" = "10.0.1.11", "2" = "10.0.2.12", "3" = "10.0.3.13" }
    error_message = "node id → fixed IP"
  }
  assert {
    condition     = alltrue([for id, ud in output.node_user_data : strcontains(ud, "node-id: \"${id}\"") || strcontains(ud, "\"node-id\": \"${id}\"")])
    error_message = "each node's user data names its node id"
  }
  assert {
    # fstab mounts the volume at a reboot before the data service starts; the boot script
    # checks it again after.
    condition     = alltrue([for id, ud in output.node_user_data : strcontains(ud, "\"persist\": \"fstab\"")])
    error_message = "each node's volume is persisted in fstab"
  }
  assert {
    # User data runs once per instance: cps-attach runs from a per-boot script, at every boot,
    # so a boot cut off half-way is finished by the next one.
    condition     = alltrue([for id, ud in output.node_user_data : strcontains(ud, "boot=/var/lib/cloud/scripts/per-boot/cps-attach.sh\n") && strcontains(ud, "mv -f \"$boot.partial\" \"$boot\"\n") && endswith(ud, "\nsync\nexec \"$boot\"\n")])
    error_message = "the user data installs the per-boot script and runs it"
  }
  assert {
    # tests/iam-actions.txt is also checked against the README's IAM section (ci/terraform/run).
    condition     = output.iam_actions == sort(split("\n", trimspace(file("tests/iam-actions.txt"))))
    error_message = "the nodes get exactly the actions cps-attach needs"
  }
}

run "no_roll_when_disabled" {
  command = plan
  variables {
    roll_enabled = false
  }
  assert {
    condition     = length(terraform_data.roll) == 0
    error_message = "roll_enabled = false leaves the roll out"
  }
}

run "script_and_commands_exclude_each_other" {
  command = plan
  variables {
    node_config_script = "IyEvYmluL2Jhc2gK"
  }
  expect_failures = [aws_launch_template.node]
}

run "secrets_come_from_the_stores_and_the_role_reads_only_those" {
  command = plan

  assert {
    condition     = strcontains(module.node_config["2"].yaml, "\"content-from\": \"ssm:/kafka/2/jaas\"") && strcontains(module.node_config["2"].yaml, "\"content-from\": \"secretsmanager:kafka/tls-key\"")
    error_message = "content_from files are written as content-from references"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "ReadNodeFileParameters"]).Resource == ["arn:aws:ssm:*:*:parameter/kafka/2/jaas"]
    error_message = "ssm:GetParameter on exactly the named parameter"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "ReadNodeFileSecrets"]).Resource == ["arn:aws:secretsmanager:*:*:secret:kafka/tls-key-??????"]
    error_message = "secretsmanager:GetSecretValue on exactly the named secret"
  }
  assert {
    condition     = !contains(output.iam_actions, "kms:Decrypt")
    error_message = "no kms:Decrypt without a customer-managed key"
  }
}

run "a_customer_key_for_secrets_adds_decrypt_on_that_key" {
  command = plan
  variables {
    node_secrets_kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444"
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.node.policy).Statement : s if s.Sid == "DecryptNodeFileSecrets"]).Resource == "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444"
    error_message = "kms:Decrypt on the secrets' key"
  }
}

run "no_secret_access_without_content_from" {
  command = plan
  variables {
    node_files = [
      { node_id = "2", node_files_toupload = [{ contents = "aGVsbG8K", destination = "/etc/kafka/extra.properties" }] },
    ]
    node_secrets_kms_key_arn = "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444"
  }
  assert {
    condition     = length([for a in output.iam_actions : a if startswith(a, "ssm:") || startswith(a, "secretsmanager:") || startswith(a, "kms:")]) == 0
    error_message = "nothing to read, no secret actions"
  }
}

run "a_file_has_contents_or_content_from" {
  command = plan
  variables {
    node_files = [
      { node_id = "2", node_files_toupload = [{ contents = "aGVsbG8K", content_from = "ssm:/x", destination = "/etc/x" }] },
    ]
  }
  expect_failures = [var.node_files]
}

run "a_release_download_is_verified_before_it_runs" {
  command = plan
  variables {
    cps_attach_source = {
      url    = "https://github.com/cps-project/cps/releases/download/v0.1.0/cps-attach-0.1.0-x86_64-linux"
      sha256 = "3f2b7c1d9e8a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c"
    }
  }
  assert {
    condition = alltrue([for id, ud in output.node_user_data : strcontains(ud,
    "echo '3f2b7c1d9e8a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c  '\"$tmp\" | sha256sum -c -\n")])
    error_message = "the release binary's SHA-256 is checked with sha256sum -c"
  }
  assert {
    # In this order: download, verify, install, run — nothing runs before the checksum matched.
    condition     = alltrue([for id, ud in output.node_user_data : can(regex("(?s)curl -fsSL --retry 3 -o \"\\$tmp\" 'https://github.com/cps-project/cps/releases/download/v0.1.0/cps-attach-0.1.0-x86_64-linux'.*sha256sum -c -\\n  install -m 0755 \"\\$tmp\" /usr/local/bin/cps-attach\\n.*exec /usr/local/bin/cps-attach ", ud))])
    error_message = "the user data downloads the release, verifies it, installs it, then runs it"
  }
  assert {
    # At a later boot the binary is there: verified again before it is trusted, else fetched.
    condition     = alltrue([for id, ud in output.node_user_data : strcontains(ud, "if ! echo '3f2b7c1d9e8a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c  /usr/local/bin/cps-attach' | sha256sum -c --status - 2>/dev/null; then\n")])
    error_message = "the boot script checks the installed binary's SHA-256 before it runs it"
  }
}
