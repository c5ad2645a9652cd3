# Expected to fail (ci/terraform/run checks how): retain_on_destroy = false on a retained
# cluster, without the state move first, is refused (the volumes would otherwise be destroyed
# and made again, empty).

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
  mock_resource "aws_dynamodb_table" {
    defaults = { arn = "arn:aws:dynamodb:eu-west-1:123456789012:table/kafka-cps-relocation" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/kafka-dlm-1" }
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

run "apply_retained" {}

run "opt_out_without_a_state_move" {
  command = plan
  variables {
    retain_on_destroy = false
  }
}
