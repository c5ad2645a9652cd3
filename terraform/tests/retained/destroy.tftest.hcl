# Expected to fail (ci/terraform/run checks how): a retained cluster is applied, every change
# that would replace a data volume leaves it in place, and the test's own teardown — a
# `terraform destroy` — is refused for each volume and interface (prevent_destroy).

# The mocked values every test of the module shares.
mock_provider "aws" {
  source = "./tests/mocks"
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
  security_groups = ["sg-0123456789abcdef0"]
  data_volume = {
    size_in_gibs           = 100
    type                   = "gp3"
    mount_path             = "/var/lib/kafka"
    file_system_type       = "xfs"
    mount_path_owner_user  = "kafka"
    mount_path_owner_group = "kafka"
  }
  roll_command = "true"
}

run "apply_retained" {
  assert {
    condition     = length(aws_ebs_volume.node) == 3 && length(aws_network_interface.node) == 3 && length(aws_ebs_volume.deletable) == 0 && length(aws_network_interface.deletable) == 0
    error_message = "volumes and interfaces are retained by default"
  }
}

run "a_size_change_is_in_place" {
  command = plan
  variables {
    data_volume = {
      size_in_gibs           = 250
      type                   = "gp3"
      mount_path             = "/var/lib/kafka"
      file_system_type       = "xfs"
      mount_path_owner_user  = "kafka"
      mount_path_owner_group = "kafka"
    }
  }
  assert {
    condition     = aws_ebs_volume.node["1"].id == run.apply_retained.node_volume_ids["1"] && aws_ebs_volume.node["1"].size == 250
    error_message = "the same volume, larger"
  }
}

run "encryption_changes_leave_the_volume_and_say_so" {
  command = plan
  variables {
    encrypted  = false
    kms_key_id = "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444"
  }
  assert {
    condition     = aws_ebs_volume.node["1"].id == run.apply_retained.node_volume_ids["1"] && aws_ebs_volume.node["1"].encrypted && aws_ebs_volume.node["1"].kms_key_id != "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444"
    error_message = "encrypted and kms_key_id are ignored on an existing volume"
  }
  expect_failures = [check.data_volumes_as_configured]
}

run "a_new_zone_is_refused_without_relocation" {
  command = plan
  override_data {
    target = data.aws_subnet.node["2"]
    values = { availability_zone = "eu-west-1b" }
  }
  expect_failures = [aws_ebs_volume.node]
}

run "a_new_zone_with_relocation_leaves_the_volume_to_cps_attach" {
  command = plan
  variables {
    relocation = "snapshot"
  }
  override_data {
    target = data.aws_subnet.node["2"]
    values = { availability_zone = "eu-west-1b" }
  }
  assert {
    condition     = aws_ebs_volume.node["2"].id == run.apply_retained.node_volume_ids["2"] && aws_ebs_volume.node["2"].availability_zone == "eu-west-1a"
    error_message = "the volume stays where it is (cps-attach relocates it at the node's next boot)"
  }
}
